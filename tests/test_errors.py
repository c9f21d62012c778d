"""Bad input fails fast with a clear message on every rank (never a hang until the PG timeout)."""

from __future__ import annotations

import time
import warnings
from typing import Any

import pytest
import torch

from lightning_hybrid import HybridStrategy
from lightning_hybrid.testing import run_distributed
from tests.helpers import TinyRec, loader, quiet_trainer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchrec import EmbeddingBagCollection


def test_unknown_sharding_type_is_refused_before_launch() -> None:
    with pytest.raises(ValueError, match=r"Unknown sharding type 'row_wize' for table 't_user'.*row_wise"):
        HybridStrategy(embedding_sharding={"t_user": "row_wize"})


def test_unknown_kernel_and_launcher_are_refused() -> None:
    with pytest.raises(ValueError, match="'fast'.*'fused' or 'dense'"):
        HybridStrategy(embedding_kernels={"t_user": "fast"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="launcher='fork'"):
        HybridStrategy(launcher="fork")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data_parallel=0"):
        HybridStrategy(data_parallel=0)


class CustomEBC(EmbeddingBagCollection):
    """A subclass with its own forward: torchrec's sharder would silently drop the override."""

    def forward(self, features: Any) -> Any:
        return super().forward(features)


def _fit_and_capture(case: str) -> dict[str, Any]:
    """Run a 2-rank fit that must fail; report the error this rank saw and how long it took."""
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = TinyRec()
    strategy_kwargs: dict[str, Any] = {"failure_grace_s": 5.0}
    data = loader(8, n=32, ranks=2)
    if case == "plan":
        strategy_kwargs["data_parallel"] = 3
    elif case == "unknown_table":
        strategy_kwargs["embedding_sharding"] = {"t_nope": "row_wise"}
    elif case == "no_room":
        strategy_kwargs["embedding_memory_per_rank"] = 512
    elif case == "unshardable":
        tables = model.tables
        model.tables = CustomEBC(tables=tables.embedding_bag_configs())
    elif case == "tp_no_plan":
        strategy_kwargs["tensor_parallel"] = 2
    elif case == "tp_bad_pattern":
        strategy_kwargs["tensor_parallel"] = 2
        strategy_kwargs["tensor_parallel_plan"] = {"mlp.9": "colwise"}
    elif case == "tp_too_big":
        strategy_kwargs["tensor_parallel"] = 4
    elif case == "bad_id":
        data = loader(8, n=32, ranks=2, bad_id_at=3)  # sample 3 is rank 1's second sample
    start = time.monotonic()
    try:
        quiet_trainer(strategy=HybridStrategy(**strategy_kwargs), devices=2, max_steps=2).fit(model, train_dataloaders=data)
    except BaseException as err:  # noqa: BLE001
        return {"type": type(err).__name__, "message": str(err), "seconds": time.monotonic() - start}
    return {"type": None, "message": "", "seconds": time.monotonic() - start}


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("plan", r"data_parallel=3.*world size 2"),
        ("unknown_table", r"names tables \['t_nope'\].*Known tables"),
        ("no_room", r"could not place the embedding tables on 2 ranks"),
        ("unshardable", r"cannot shard the embedding module 'tables' of type CustomEBC"),
        ("tp_no_plan", r"tensor_parallel=2\) needs a plan.*TinyRec.tensor_parallel_plan"),
        ("tp_bad_pattern", r"pattern 'mlp.9' matches no module of TinyRec"),
        ("tp_too_big", r"world size 2 is not divisible by tensor_parallel=4"),
    ],
)
def test_setup_errors_reach_every_rank(case: str, pattern: str) -> None:
    ranks = run_distributed(_fit_and_capture, 2, case, init_process_group=False, timeout_s=90)
    for rank, result in enumerate(ranks):
        assert result["type"] == "ValueError", (rank, result)
        assert __import__("re").search(pattern, result["message"], flags=__import__("re").S), (rank, result["message"])
        assert result["seconds"] < 30


def test_out_of_range_id_fails_every_rank_quickly() -> None:
    ranks = run_distributed(_fit_and_capture, 2, "bad_id", init_process_group=False, timeout_s=120)
    bad = ranks[1]
    assert bad["type"] == "ValueError"
    assert "Feature 'item' has id 47, outside table 't_item' of 40 rows" in bad["message"]
    # the other rank was blocked in the embedding all-to-all; it ends with the root cause attached
    other = ranks[0]
    assert other["type"] is not None
    assert "rank 1 failed first with: ValueError: Feature 'item' has id 47" in other["message"]
    assert max(r["seconds"] for r in ranks) < 30
