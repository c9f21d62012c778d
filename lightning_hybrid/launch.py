"""How HybridStrategy starts its processes.

* ``external``: torchrun, SLURM (through Lightning's environment detection) or any launcher that
  sets RANK/WORLD_SIZE/LOCAL_RANK already started them; nothing to do.
* ``subprocess``: Lightning's script launcher, which re-runs ``sys.argv`` for ranks 1..N-1 (what
  ``strategy="ddp"`` does). The main process is rank 0 and keeps its trainer state. It cannot work
  under pytest (the children would re-run the whole test session) or in a notebook.
* ``spawn``: new processes via ``torch.multiprocessing``. Works anywhere, including pytest.
  Where the platform has it they fork from a fork server that has torch, torchrec, Lightning and
  this package imported once (the first launch starts it; every later one skips the ~8 s of
  imports per rank a fresh interpreter pays), and start as spawned ranks do: the caller's
  environment and global torch state of now, parameters not shared with the parent. Elsewhere,
  fresh interpreters (``start_method="spawn"``).
  Lightning's own spawn launcher sends rank 0's ``state_dict()`` back, which fails for sharded
  tables (ShardedTensor cannot be unpickled in the parent) and would hold only rank 0's shards;
  ours gathers full tensors from all ranks first, and also sends back the fit-loop progress so
  ``trainer.global_step`` is right in the parent.
* ``auto``: external when the environment already created the processes, spawn under pytest or
  in an interactive session, subprocess otherwise.

Whichever started them, `init_process_group` joins the ranks and has the process group destroyed
at interpreter exit for every backend (Lightning does it for NCCL only).
"""

from __future__ import annotations

import atexit
import io
import os
import sys
import tempfile
from typing import Any, Literal

import torch
import torch.multiprocessing as mp
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.fabric.strategies.launchers.multiprocessing import _disable_module_memory_sharing
from lightning.fabric.utilities.distributed import _destroy_dist_connection, _init_dist_connection
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies.launchers.multiprocessing import (
    _GlobalStateSnapshot,
    _MultiProcessingLauncher,
    _WorkerOutput,
)
from lightning.pytorch.trainer.states import TrainerFn

from lightning_hybrid import forkserver
from lightning_hybrid.checkpoint import full_state_dict

LauncherName = Literal["auto", "subprocess", "spawn"]



def init_process_group(environment: ClusterEnvironment, backend: str, **kwargs: Any) -> None:
    """Lightning's `_init_dist_connection`, and the process group destroyed at interpreter exit
    (before finalization) whatever the backend.

    Why: a rank that leaves it to interpreter exit under torchrun or SLURM can abort there
    ("terminate called without an active exception", SIGABRT) when gloo's worker threads still
    hold finished asynchronous work (pytorch/pytorch#179291): the job fails after training
    succeeded. Lightning registers the same handler for NCCL only; the spawn launcher also destroys
    the group itself. A group the user destroys first makes the handler a no-op."""
    initialized_here = not torch.distributed.is_initialized()
    _init_dist_connection(environment, backend, **kwargs)
    if initialized_here and backend != "nccl":  # (Lightning registered it for nccl)
        atexit.register(_destroy_dist_connection)


def spawn_start_method() -> Literal["forkserver", "spawn"]:
    """How the ``spawn`` launcher starts ranks here: from a warm fork server where the platform has one."""
    return forkserver.default_start_method()


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


class _EnvironmentWhenPickled:
    """Unpickles as the caller's ``os.environ`` at the moment it was pickled for a rank, after the
    arguments before it: pickling Lightning's WandbLogger starts the wandb service (in its
    ``__getstate__``), which the ranks then find through the ``WANDB_SERVICE`` it sets."""

    def __reduce__(self) -> tuple[Any, tuple[dict[str, str]]]:
        return dict, (dict(os.environ),)


class HybridSpawnLauncher(_MultiProcessingLauncher):
    """Spawn launcher that returns whole (gathered) weights and loop progress to the parent."""

    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        if self._start_method != "forkserver":
            return super().launch(function, *args, trainer=trainer, **kwargs)
        # Lightning's launch treats a fork server like fork (no global-state snapshot, CPU tensors
        # left shared with the parent); ranks from the server must start as spawned ones do
        if self._already_fit and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            raise NotImplementedError(
                "Calling `trainer.fit()` twice on the same Trainer instance with HybridStrategy's spawn launcher is not "
                "supported: create a new Trainer and pass `fit(ckpt_path=...)`."
            )
        assert self._strategy.cluster_environment is not None
        os.environ["MASTER_PORT"] = str(self._strategy.cluster_environment.main_port)
        return_queue = forkserver.context("forkserver").SimpleQueue()
        # (the environment last: pickling the trainer before it can change it, see _EnvironmentWhenPickled)
        process_args = [trainer, function, args, kwargs, return_queue, _GlobalStateSnapshot.capture(), _EnvironmentWhenPickled()]
        process_context = mp.start_processes(
            self._forkserver_wrapping, args=process_args, nprocs=self._strategy.num_processes, start_method="forkserver", join=False
        )
        self.procs = process_context.processes
        while not process_context.join():
            pass
        worker_output = return_queue.get()
        if trainer is None:
            return worker_output
        self._already_fit |= trainer.state.fn == TrainerFn.FITTING
        self._recover_results_in_main_process(worker_output, trainer)
        return worker_output.trainer_results

    def _forkserver_wrapping(
        self, process_idx: int, trainer: Any, function: Any, args: Any, kwargs: Any, return_queue: Any,
        global_states: _GlobalStateSnapshot, parent_env: dict[str, str],
    ) -> None:
        forkserver.adopt_environment(parent_env)  # (the server's environment is a snapshot from its start)
        if isinstance(self._strategy.accelerator, CPUAccelerator):
            # torch pickles CPU tensors to the ranks through shared memory: each rank needs its own weights
            args, kwargs = _disable_module_memory_sharing((args, kwargs))
        self._wrapping_function(process_idx, trainer, function, args, kwargs, return_queue, global_states)

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
