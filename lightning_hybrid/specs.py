"""What a LightningModule may declare to take part in hybrid parallelism (models import this
module, not `lightning_hybrid.parallel`).

HybridStrategy looks for these methods by name; the Protocols say their shapes, so a model can
state (and a type checker verify) what it provides:

- `TensorParallelModel.tensor_parallel_plan()` -> module-name pattern -> ``"colwise"`` /
  ``"rowwise"`` / ... (`lightning_hybrid.parallel.tensor`), used with ``tensor_parallel > 1``;
- `PipelineModel.pipeline_spec()` -> `PipelineSpec` (the blocks cut into stages, what runs before
  and after them), used with ``pipeline_parallel > 1``;
- `PlannableModel.planner_spec(global_batch)` -> `lightning_hybrid.planner.ModelSpec`, used by
  ``plan="auto"`` for models other than the reference recommender;
- `TableKernelModel.table_kernels()` -> table name -> ``"dense"`` / ``"fused"``: kernels the model
  needs (e.g. a tied output reads the table's weight, which must take gradients: ``"dense"``);
  merged with ``embedding_kernels`` (a contradiction is refused).

Also here, for models to use: `pipeline_runner(module)` (the runner evaluation code calls under a
pipeline) and `reference_plan` (the tensor-parallel plan of `CausalSelfAttentionBlock` stacks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from lightning_hybrid.parallel.pipeline import PipelineSpec, pipeline_runner
from lightning_hybrid.parallel.tensor import StyleName, reference_plan

if TYPE_CHECKING:
    from lightning_hybrid.planner.cost import ModelSpec


@runtime_checkable
class TensorParallelModel(Protocol):
    def tensor_parallel_plan(self) -> dict[str, StyleName]: ...


@runtime_checkable
class PipelineModel(Protocol):
    def pipeline_spec(self) -> PipelineSpec: ...


@runtime_checkable
class PlannableModel(Protocol):
    def planner_spec(self, global_batch: int) -> ModelSpec: ...


@runtime_checkable
class TableKernelModel(Protocol):
    def table_kernels(self) -> dict[str, str]: ...


__all__ = [
    "PipelineModel", "PipelineSpec", "PlannableModel", "StyleName", "TableKernelModel", "TensorParallelModel",
    "pipeline_runner", "reference_plan",
]
