"""An exponential moving average of the weights that works on sharded models.

Lightning's `EMAWeightAveraging` keeps a deep copy of the LightningModule made before the strategy
sets the model up, and averages it parameter by parameter with the module's. Under
HybridStrategy the module it copied no longer exists in that form: tables are torchrec shards,
tensor-parallel weights DTensors, and a copy of the whole catalogue per rank is what sharding
exists to avoid. `EMAWeightAveraging` here takes the same arguments and means the same thing, but
averages what each rank holds (`lightning_hybrid.checkpoint.local_parts`: a table's local shards,
a DTensor's local tensor, a replicated weight), after the strategy's setup, with no communication:
every rank's average is the average of its own part, so the sharded average is the average of the
whole model. It works under any strategy (a plain module's parts are its tensors).

What a user sees is Lightning's behaviour: validation during ``fit`` runs on the averaged weights,
a checkpoint's ``state_dict`` holds them (so ``test``, ``predict`` and ``lightning-hybrid
export`` of ``best.ckpt`` serve the average) with the training weights beside them under
``current_model_state`` (sharded like the model under HybridStrategy), a resumed ``fit`` goes on
from both, and the module holds the average when ``fit`` ends.

Tested against one process under dp, tp, pp and FSDP with a row-wise sharded table on the dense
and the fused kernel (`tests/test_averaging.py`); other sharding types (several shards per rank
included) and dp modes go through the same per-rank parts. Refused: the pipeline balancer that
moves blocks between ranks while training (``pipeline_rebalance_every``), whose moved weights the
per-rank average would not follow. Under ``data_parallel_mode="local_sgd"``
each replica averages its own weights between the weight averages, and a resumed fit starts every
replica's average from the checkpoint's (rank 0's).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lightning_hybrid.checkpoint import like_with_parts, local_parts

#: the checkpoint key of the training weights (Lightning's `WeightAveraging` uses the same)
TRAINING_WEIGHTS = "current_model_state"


def _averaged_parts(module: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """name -> views of the floating-point state this rank holds (parameters and buffers)."""
    return {
        name: parts
        for name, value in module.state_dict().items()
        if isinstance(value, torch.Tensor) and (parts := local_parts(value)) and all(p.is_floating_point() for p in parts)
    }


def _cloned_parts(state: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
    """name -> copies of this rank's parts of each tensor of a state dict."""
    return {name: [p.detach().clone() for p in local_parts(v)] for name, v in state.items() if isinstance(v, torch.Tensor)}


class EMAWeightAveraging(Callback):
    """Exponential moving average of the weights, shard-aware (module docstring).

    Args (Lightning's `EMAWeightAveraging`'s, with the same meaning):
        decay: weight of the old average at each update: ``average = decay * average + (1 - decay)
            * weights``; the first update copies the weights.
        update_every_n_steps: update after every n-th optimizer step (0: never per step).
        update_starting_at_step: first optimizer step (0-based) that updates; ``None``: the first.
        update_starting_at_epoch: also update at the end of every epoch from this one on (0-based);
            ``None``: no per-epoch updates.
    """

    def __init__(
        self,
        *,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMAWeightAveraging(decay={decay!r}): use a value in [0, 1), e.g. 0.999 (0 keeps the last weights).")
        if update_every_n_steps < 0:
            raise ValueError(f"EMAWeightAveraging(update_every_n_steps={update_every_n_steps!r}): use 0 (no per-step updates) or more.")
        if update_every_n_steps == 0 and update_starting_at_epoch is None:
            raise ValueError(
                "EMAWeightAveraging(update_every_n_steps=0, update_starting_at_epoch=None) never updates the average: "
                "set update_every_n_steps >= 1 or update_starting_at_epoch."
            )
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch
        self._live: dict[str, list[torch.Tensor]] | None = None  # views of the module's own tensors
        self._average: dict[str, list[torch.Tensor]] | None = None
        self._n_averaged = 0
        self._latest_update_step = 0
        self._latest_update_epoch = -1
        self._pending: tuple[Any, Any] | None = None  # what a checkpoint restored before on_fit_start
        self._flat: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Lightning's `EMAWeightAveraging.should_update`: after which optimizer steps / epochs to update."""
        if step_idx is not None:
            started = self.update_starting_at_step is None or step_idx >= self.update_starting_at_step
            if started and self.update_every_n_steps > 0 and step_idx % self.update_every_n_steps == 0:
                return True
        return epoch_idx is not None and self.update_starting_at_epoch is not None and epoch_idx >= self.update_starting_at_epoch

    # -- the average ------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pipeline = getattr(getattr(trainer.strategy, "options", None), "pipeline", None)
        if getattr(pipeline, "pipeline_rebalance_every", 0):
            raise ValueError(
                f"EMAWeightAveraging with HybridStrategy(pipeline_rebalance_every={pipeline.pipeline_rebalance_every}): the "
                "balancer moves blocks between ranks while training, and each rank's average would stay with the blocks it "
                "had. Balance once before training instead (pipeline_rebalance_every=0, pipeline_split='balanced') or drop the callback."
            )
        # after the strategy's setup: the module is sharded and these views stay valid (optimizers
        # update in place); the average starts as the weights, as Lightning's copy of the module does
        self._live = _averaged_parts(pl_module)
        self._average = {name: [p.detach().clone() for p in parts] for name, parts in self._live.items()}
        # (flat, once: every optimizer step updates them all with one foreach call)
        self._flat = ([a for parts in self._average.values() for a in parts], [w for parts in self._live.values() for w in parts])
        if self._pending is not None:  # (a strategy that restores before its setup, e.g. DDP)
            self._apply_pending()

    def _update(self) -> None:
        averages, weights = self._flat
        with torch.no_grad():
            if self._n_averaged == 0:
                torch._foreach_copy_(averages, weights)
            else:
                torch._foreach_lerp_(averages, weights, 1.0 - self.decay)
        self._n_averaged += 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimizer steps: with gradient accumulation, once per n batches
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            self._update()
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > self._latest_update_epoch and self.should_update(epoch_idx=trainer.current_epoch):
            self._update()
            self._latest_update_epoch = trainer.current_epoch

    def _swap(self) -> None:
        assert self._live is not None and self._average is not None
        with torch.no_grad():
            for name, parts in self._live.items():
                for live, average in zip(parts, self._average[name], strict=True):
                    held = live.clone()
                    live.copy_(average)
                    average.copy_(held)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average is not None and trainer.state.fn == TrainerFn.FITTING:
            self._swap()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average is not None and trainer.state.fn == TrainerFn.FITTING:
            self._swap()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._live is None or self._average is None:
            return
        with torch.no_grad():  # as Lightning's: the module holds the average after fit
            for name, parts in self._live.items():
                torch._foreach_copy_(parts, self._average[name])

    # -- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"latest_update_step": self._latest_update_step, "latest_update_epoch": self._latest_update_epoch, "n_averaged": self._n_averaged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_step = state_dict["latest_update_step"]
        self._latest_update_epoch = state_dict.get("latest_update_epoch", -1)
        self._n_averaged = state_dict.get("n_averaged", 1)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average is None:  # outside fit: the module's weights are what there is
            return
        # ``state_dict`` holds views of the module (written later, maybe asynchronously): the
        # average goes in as a copy with the same sharding, the training weights stay beside it
        weights = checkpoint["state_dict"]
        checkpoint[TRAINING_WEIGHTS] = weights
        checkpoint["state_dict"] = {
            name: like_with_parts(value, [a.clone() for a in self._average[name]]) if name in self._average else value
            for name, value in weights.items()
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # test/predict: the checkpoint's state_dict is the average
            return
        # ``state_dict``: the average (HybridStrategy has loaded the training weights into the module
        # and hands the average over here; other strategies loaded the average into the module and
        # the training weights are under TRAINING_WEIGHTS); neither: a checkpoint without averaging
        # whose weights the module holds, where the average starts
        averaged, training = checkpoint.get("state_dict"), checkpoint.get(TRAINING_WEIGHTS)
        self._pending = (_cloned_parts(averaged) if averaged else None, _cloned_parts(training) if training else None)
        if self._live is not None:  # (restored after on_fit_start, as HybridStrategy does; else there)
            self._apply_pending()

    def _apply_pending(self) -> None:
        assert self._live is not None and self._average is not None
        averaged, training = self._pending or (None, None)
        self._pending = None
        with torch.no_grad():
            for name, parts in self._live.items():
                if training is not None and name in training:
                    torch._foreach_copy_(parts, training[name])
                source = averaged[name] if averaged is not None and name in averaged else parts
                torch._foreach_copy_(self._average[name], source)
