"""Pipeline options and batch shapes checked before anything runs (`lightning_hybrid.parallel.pipeline`).

Kept apart from the runner so the strategy's constructor (and LightningCLI's ``--help``) can
validate the schedule options without importing torch's pipelining.
"""

from __future__ import annotations

from typing import Any, Literal

ScheduleName = Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"]
SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
MULTI_STAGE = ("interleaved_1f1b", "zero_bubble")


def check_stage_count(num_blocks: int, num_stages: int, schedule: str | None = None) -> None:
    if num_stages > num_blocks:
        hint = " (interleaved and zero-bubble schedules run several stages per rank)" if schedule in MULTI_STAGE else ""
        raise ValueError(
            f"Pipeline: {num_stages} stages{hint} but the model has only {num_blocks} blocks; every stage needs at "
            f"least one. Lower pipeline_parallel / pipeline_virtual_stages, or use a model with more blocks."
        )


def validate_pipeline_options(
    *, schedule: str, pipeline_parallel: int, virtual_stages: int, microbatches: int | None
) -> None:
    """Checks that need no model (run in the strategy's constructor and again at setup)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"HybridStrategy(pipeline_schedule={schedule!r}): use one of {list(SCHEDULES)}.")
    if virtual_stages < 1:
        raise ValueError(f"HybridStrategy(pipeline_virtual_stages={virtual_stages}) must be >= 1.")
    if schedule in MULTI_STAGE and virtual_stages < 2:
        raise ValueError(
            f"pipeline_schedule={schedule!r} runs several stages per rank: set pipeline_virtual_stages >= 2 "
            f"(got {virtual_stages}), or use 'gpipe' / '1f1b'."
        )
    if schedule not in MULTI_STAGE and virtual_stages != 1:
        raise ValueError(
            f"pipeline_schedule={schedule!r} runs one stage per rank; pipeline_virtual_stages={virtual_stages} needs "
            f"'interleaved_1f1b' or 'zero_bubble'."
        )
    if microbatches is not None and microbatches < 1:
        raise ValueError(f"HybridStrategy(pipeline_microbatches={microbatches}) must be >= 1.")
    if microbatches is not None and schedule == "1f1b" and microbatches < pipeline_parallel:
        raise ValueError(
            f"pipeline_schedule='1f1b' needs pipeline_microbatches >= pipeline_parallel ({pipeline_parallel}); got "
            f"{microbatches}. Use more microbatches (fewer means a larger bubble anyway) or 'gpipe'."
        )
    if microbatches is not None and schedule in MULTI_STAGE:
        rounds = max(1, microbatches // pipeline_parallel)
        if microbatches % rounds != 0:
            raise ValueError(
                f"pipeline_schedule={schedule!r} needs pipeline_microbatches to be a multiple of "
                f"max(1, microbatches // pipeline_parallel) = {rounds}; got {microbatches}. Use a multiple of {pipeline_parallel}."
            )


def check_batch_divides(batch_size: int, microbatches: int, what: str = "a batch") -> None:
    if batch_size % microbatches != 0:
        raise ValueError(
            f"Pipeline: {what} of {batch_size} samples does not split into pipeline_microbatches={microbatches} equal "
            f"microbatches. Use a batch size divisible by {microbatches} (and drop_last=True on the training loader, or a "
            f"data set size that leaves a divisible last batch), or change pipeline_microbatches."
        )


def check_loader_batches(loader: Any, microbatches: int) -> None:
    """Refuse, before the first step, a training loader whose batches cannot be cut into the
    pipeline's microbatches (the last batch of an epoch included); loaders whose batch size or
    length are unknown are checked per batch instead."""
    batch_size = getattr(loader, "batch_size", None)
    sampler = getattr(loader, "sampler", None)
    if not isinstance(batch_size, int) or sampler is None or not hasattr(sampler, "__len__"):
        return
    check_batch_divides(batch_size, microbatches, "the training batch size")
    last = len(sampler) % batch_size
    if last and not getattr(loader, "drop_last", False):
        check_batch_divides(last, microbatches, f"the last training batch of an epoch ({len(sampler)} samples per replica)")
