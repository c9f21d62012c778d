"""The ``lightning-hybrid`` command: LightningCLI with HybridStrategy registered.

    lightning-hybrid fit -c recipes/dlrm_quickstart.yaml
    lightning-hybrid fit -c recipes/dlrm_quickstart.yaml --print_config   # every option, resolved
    lightning-hybrid convert runs/x/last.ckpt model.ckpt     # sharded directory -> one file (and back)
    lightning-hybrid export runs/x/last.ckpt serving.pt      # one file for serving: model + item embeddings by raw id
    lightning-hybrid plan -c recipes/quickstart.yaml --cluster cpu-2core --out plan.yaml   # choose a layout

Models and data modules are given by ``class_path`` (any LightningModule / LightningDataModule),
the strategy as ``trainer.strategy: hybrid`` or with ``class_path: lightning_hybrid.HybridStrategy``
and ``init_args`` for its options.
"""

from __future__ import annotations

import sys
import warnings

USAGE = """usage: lightning-hybrid {fit,validate,test,predict,convert,export,plan} ...

  fit, validate, test, predict   LightningCLI subcommands (-c recipe.yaml; `lightning-hybrid fit --help`
                                 lists every option, HybridStrategy's included)
  convert SRC DST                sharded checkpoint directory <-> one Lightning checkpoint file
  export SRC DST                 one file for serving: the whole model, item embeddings keyed by raw id
  plan -c recipe.yaml            rank the parallel layouts of a recipe on a cluster (--cluster, --out)

See the module docstring of lightning_hybrid.cli and docs/getting-started.md.
"""


def main(args: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return
    if argv and argv[0] == "convert":
        from lightning_hybrid.checkpoint import convert_main

        convert_main(argv[1:])
        return
    if argv and argv[0] == "export":
        from lightning_hybrid.export import export_main

        export_main(argv[1:])
        return
    if argv and argv[0] == "plan":
        from lightning_hybrid.planner.cli import main as plan_main

        plan_main(argv[1:])
        return
    # (Lightning, torchrec and the strategy are imported only here: --help, convert, export and
    # plan start in a fraction of the time)
    from lightning_hybrid.lightning_cli import run

    run(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
