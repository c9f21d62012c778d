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

import os
import sys
import warnings

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

import lightning_hybrid  # noqa: F401 - registers strategy="hybrid"

USAGE = """usage: lightning-hybrid {fit,validate,test,predict,convert,export,plan} ...

  fit, validate, test, predict   LightningCLI subcommands (-c recipe.yaml; `lightning-hybrid fit --help`
                                 lists every option, HybridStrategy's included)
  convert SRC DST                sharded checkpoint directory <-> one Lightning checkpoint file
  export SRC DST                 one file for serving: the whole model, item embeddings keyed by raw id
  plan -c recipe.yaml            rank the parallel layouts of a recipe on a cluster (--cluster, --out)

See the module docstring of lightning_hybrid.cli and docs/getting-started.md.
"""


class HybridCLI(LightningCLI):
    """LightningCLI whose defaults suit multi-process CPU/GPU runs of this package (module level:
    the spawn launcher pickles it by reference)."""

    def before_instantiate_classes(self) -> None:
        # one thread per rank unless the user chose otherwise: ranks share the machine's cores
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self._follow_checkpoint_item_ids()

    def _follow_checkpoint_item_ids(self) -> None:
        """With --ckpt_path, a data module that can follow a checkpoint's id -> row mapping
        (SequenceDataModule(item_ids_from=...)) follows that checkpoint's, unless told otherwise."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        ckpt = config.get("ckpt_path") if config is not None else None
        init_args = config.get("data", {}).get("init_args") if config is not None and config.get("data") else None
        if not ckpt or init_args is None or "item_ids_from" not in init_args or init_args.get("item_ids_from"):
            return
        if os.path.exists(str(ckpt)):
            from lightning_hybrid.data.item_ids import saved_item_ids

            if saved_item_ids(str(ckpt)) is not None:
                init_args["item_ids_from"] = str(ckpt)


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
    HybridCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
