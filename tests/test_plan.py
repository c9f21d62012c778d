"""Tier 1: the parallel plan and its validation."""

import pytest

from lightning_hybrid import ParallelPlan


def test_auto_fills_data_parallel() -> None:
    plan = ParallelPlan.resolve(world_size=8, data_parallel="auto", tensor_parallel=2, pipeline_parallel=2)
    assert (plan.data_parallel, plan.tensor_parallel, plan.pipeline_parallel) == (2, 2, 2)
    assert plan.mesh_shape == (2, 2, 2)
    assert plan.world_size == 8


def test_auto_tensor_parallel_fills_a_node() -> None:
    plan = ParallelPlan.resolve(world_size=16, tensor_parallel="auto", devices_per_node=8)
    assert (plan.data_parallel, plan.tensor_parallel) == (2, 8)


def test_product_must_match_world_size() -> None:
    with pytest.raises(ValueError, match=r"uses 4 ranks, but the job has world size 2"):
        ParallelPlan.resolve(world_size=2, data_parallel=4)
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tensor_parallel=4"):
        ParallelPlan.resolve(world_size=6, tensor_parallel=4)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "two"])
def test_degrees_must_be_positive_integers(bad: object) -> None:
    with pytest.raises(ValueError, match="data_parallel"):
        ParallelPlan(data_parallel=bad)  # type: ignore[arg-type]


def test_tensor_parallel_must_fit_the_node() -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel=3 does not fit the node layout of 4 devices"):
        ParallelPlan.resolve(world_size=12, tensor_parallel=3, devices_per_node=4)
