"""How HybridStrategy starts its processes.

* ``external``: torchrun, SLURM (through Lightning's environment detection) or any launcher that
  sets RANK/WORLD_SIZE/LOCAL_RANK already started them; nothing to do.
* ``subprocess``: Lightning's script launcher, which re-runs ``sys.argv`` for ranks 1..N-1 (what
  ``strategy="ddp"`` does). The main process is rank 0 and keeps its trainer state. It cannot work
  under pytest (the children would re-run the whole test session) or in a notebook.
* ``spawn``: fresh interpreters via ``torch.multiprocessing``. Works anywhere, including pytest.
  Lightning's own spawn launcher sends rank 0's ``state_dict()`` back, which fails for sharded
  tables (ShardedTensor cannot be unpickled in the parent) and would hold only rank 0's shards;
  ours gathers full tensors from all ranks first, and also sends back the fit-loop progress so
  ``trainer.global_step`` is right in the parent.
* ``auto``: external when the environment already created the processes, spawn under pytest or
  in an interactive session, subprocess otherwise.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from typing import Any, Literal

import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn

from lightning_hybrid.checkpoint import full_state_dict

LauncherName = Literal["auto", "subprocess", "spawn"]


def running_under_pytest() -> bool:
    return "PYTEST_CURRENT_TEST" in os.environ or "pytest" in sys.modules


def is_interactive() -> bool:
    main = sys.modules.get("__main__")
    return main is None or not hasattr(main, "__file__")


def resolve_launcher(name: LauncherName) -> Literal["subprocess", "spawn"]:
    if name not in ("auto", "subprocess", "spawn"):
        raise ValueError(f"HybridStrategy(launcher={name!r}) is unknown; use 'auto', 'subprocess' or 'spawn'.")
    if name != "auto":
        return name
    return "spawn" if running_under_pytest() or is_interactive() else "subprocess"


class HybridSpawnLauncher(_MultiProcessingLauncher):
    """Spawn launcher that returns whole (gathered) weights and loop progress to the parent."""

    def _collect_rank_zero_results(self, trainer: Any, results: Any) -> _WorkerOutput | None:
        checkpoint_callback = trainer.checkpoint_callback
        best_model_path = getattr(checkpoint_callback, "best_model_path", None) if checkpoint_callback else None
        # collective: every rank sends its shards to rank 0
        state_dict = full_state_dict(trainer.lightning_module)
        # no rank may exit (and tear its sockets down) while another still finishes the gather
        self._strategy.barrier()
        if self._strategy.global_rank != 0:
            return None
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            torch.save(state_dict, weights_path)
        extra = self.get_extra_results(trainer)
        return _WorkerOutput(best_model_path, weights_path, trainer.state, results, extra)

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(*args, **kwargs)
        # Shut the process group down explicitly: left to interpreter exit, gloo's threads can be
        # destroyed while still joinable ("terminate called without an active exception").
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def get_extra_results(self, trainer: Any) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        buffer = io.BytesIO()
        torch.save(trainer.fit_loop.state_dict(), buffer)
        extra["fit_loop_bytes"] = buffer.getvalue()
        return extra

    def update_main_process_results(self, trainer: Any, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        if "fit_loop_bytes" in extra:
            trainer.fit_loop.load_state_dict(torch.load(io.BytesIO(extra["fit_loop_bytes"]), weights_only=False))

    def _recover_results_in_main_process(self, worker_output: _WorkerOutput, trainer: Any) -> None:
        if worker_output.weights_path is not None:
            state = torch.load(worker_output.weights_path, weights_only=True)
            trainer.lightning_module.load_state_dict(state, strict=False)
            os.remove(worker_output.weights_path)
            worker_output = worker_output._replace(weights_path=None)
        super()._recover_results_in_main_process(worker_output, trainer)
