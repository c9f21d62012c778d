"""A training step under pipelining, inside Lightning's automatic optimization.

Lightning's closure runs ``training_step``, then ``zero_grad``, then ``backward``; a pipeline
schedule runs forward *and* backward inside ``training_step``. `PipelineStep.run` therefore sets
the gradients already there aside, runs the schedule, and stashes this step's gradients;
`PipelineStep.hand_over` (the strategy's ``backward``) adds them back between the strategy's and
the precision plugin's pre- and post-backward hooks, so ``on_before_backward`` /
``on_after_backward`` fire as in any step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_hybrid.parallel import pipeline


class PipelineStep:
    def __init__(self, runner: pipeline.PipelineRunner, spec: pipeline.PipelineSpec, options: Any = None) -> None:
        """``options``: the strategy's `PipelineOptions` (``pipeline_rebalance_every`` > 0 adds an
        `lightning_hybrid.balance.adaptive.AdaptiveBalancer`)."""
        self.runner = runner
        self.spec = spec
        self.stash: dict[torch.nn.Parameter, Tensor] = {}
        self.balancer = None
        if options is not None and options.pipeline_rebalance_every > 0:
            from lightning_hybrid.balance.adaptive import AdaptiveBalancer

            self.balancer = AdaptiveBalancer(runner, every=options.pipeline_rebalance_every, threshold=options.pipeline_rebalance_threshold)

    def run(self, module: Any, precision_plugin: Any, batch: Any, check_loss: Callable[[Tensor], bool]) -> Tensor:
        """Forward and backward of ``batch`` through the schedule; returns the step's loss.
        ``check_loss(loss) -> skip`` is the NaN/inf policy (a skipped batch keeps no gradients)."""
        size = pipeline.batch_size_of(batch)
        if self.balancer is not None:
            self.balancer.before_training_step()
        params = list(module.parameters())
        before = set_aside_gradients(params)
        skipped = False

        def check(loss: Tensor) -> bool:
            nonlocal skipped
            skipped = check_loss(loss)
            return skipped

        with precision_plugin.train_step_context():
            # Lightning divides the returned loss by the accumulated batches before backward; the
            # schedule backpropagates itself, so it applies the same factor
            loss = self.runner.train_step(batch, size, loss_scale=1.0 / module.trainer.accumulate_grad_batches, skip_lookup_backward=check)
        self.stash = stash_gradients(params, before, keep=not skipped)
        if self.spec.log_name:
            module.log(self.spec.log_name, loss, prog_bar=True, batch_size=size)
        metrics = self.runner.stage_metrics()  # per-stage busy time, bubble, imbalance (collective)
        if not self.runner.last_step.get("first_time"):
            module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=size)
        return loss

    def after_optimizer_step(self, strategy: Any) -> bool:
        """The adaptive balancer's turn (a collective at the end of each period); True when blocks
        moved, after the dp exchange was given the new parameter list."""
        if self.balancer is None:
            return False
        from lightning.pytorch.core.optimizer import LightningOptimizer

        from lightning_hybrid.checkpoint import param_names
        from lightning_hybrid.strategies.apply import dense_params

        optimizers = [o.optimizer if isinstance(o, LightningOptimizer) else o for o in strategy.optimizers]
        record = self.balancer.after_optimizer_step(optimizers)
        if record is None or not record.moved:
            return False
        exchange, module = strategy.dense_exchange, strategy.lightning_module
        if exchange is not None:
            exchange.params, exchange.names = dense_params(module, list(strategy.sharded_modules)), param_names(module)
        return True

    def hand_over(self, strategy: Any, closure_loss: Tensor) -> Tensor:
        """The strategy's ``backward``: this step's gradients return, between the hooks."""
        module = strategy.lightning_module
        strategy.pre_backward(closure_loss)
        closure_loss = strategy.precision_plugin.pre_backward(closure_loss, module)
        add_stashed(self.stash)
        self.stash = {}
        closure_loss = strategy.precision_plugin.post_backward(closure_loss, module)
        strategy.post_backward(closure_loss)
        return closure_loss


# -- gradients across Lightning's closure ------------------------------------------------------
# Lightning zeroes gradients after training_step (or not at all while accumulating) and then
# calls backward; a schedule runs forward *and* backward inside training_step. So the gradients
# already there are set aside before the schedule, this step's are stashed after it, and
# `add_stashed` puts them back in the strategy's backward.


def set_aside_gradients(params: Sequence[torch.nn.Parameter]) -> dict[torch.nn.Parameter, torch.Tensor]:
    before = {p: p.grad for p in params if p.grad is not None}
    for p in before:
        p.grad = None
    return before


def stash_gradients(
    params: Sequence[torch.nn.Parameter], before: dict[torch.nn.Parameter, torch.Tensor], *, keep: bool
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """This step's gradients (dropped when not ``keep``), with the earlier ones back in place."""
    stash = {p: p.grad for p in params if p.grad is not None} if keep else {}
    for p in params:
        # None first: torchrec's dense-kernel tables are TableBatchedEmbeddingSlice views whose
        # grad setter copies into the live gradient when there is one, which would overwrite
        # the stashed gradient (a view of it) with the earlier one
        p.grad = None
        p.grad = before.get(p)
    return stash


def add_stashed(stash: dict[torch.nn.Parameter, torch.Tensor]) -> None:
    for param, grad in stash.items():
        param.grad = grad if param.grad is None else param.grad + grad
