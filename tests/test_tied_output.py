"""Tier 1/2: the tied, shard-parallel output (`lightning_hybrid.parallel.tied_output`).

References: the full softmax on the whole table in one process (loss, gradients of the table and
of the hidden states, target ranks with seen items masked, top-k), computed on every rank from the
same seeded tensors; then the tied SASRec through HybridStrategy (dp=2, item table row-wise on the
dense kernel) against the same model on one process: step losses, parameters after the steps,
validation metrics and predict's top-k.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.testing import run_distributed

V, D = 23, 8  # table rows (row 0 is padding), width


def _case(world: int) -> dict[str, Any]:
    """Seeded tensors every rank can rebuild: the table, each rank's hidden states (different
    counts per rank), targets and seen items."""
    gen = torch.Generator().manual_seed(7)
    table = torch.randn(V, D, generator=gen)
    counts = [3 + 2 * r for r in range(world)]
    hidden = [torch.randn(n, D, generator=gen) for n in counts]
    targets = [torch.randint(1, V, (n,), generator=gen) for n in counts]
    seen = [(torch.randint(0, n, (4,), generator=gen), torch.randint(1, V, (4,), generator=gen)) for n in counts]
    return {"table": table, "hidden": hidden, "targets": targets, "seen": seen}


def _reference(case: dict[str, Any], eps: float = 0.0) -> dict[str, Any]:
    """``eps``: label smoothing written out: (1 - eps) * NLL of the target + eps * the mean NLL of
    the V - 1 items, over the softmax of the real items' logits only."""
    from lightning_hybrid.metrics import target_ranks

    table = case["table"].clone().requires_grad_(True)
    hidden = [h.clone().requires_grad_(True) for h in case["hidden"]]
    h_all, t_all = torch.cat(hidden), torch.cat(case["targets"])
    logits = h_all @ table.t()
    mask = torch.zeros(V)
    mask[0] = float("-inf")
    loss = torch.nn.functional.cross_entropy(logits + mask, t_all)  # the mean over every rank's rows
    if eps:
        logp = torch.log_softmax(logits[:, 1:], dim=1)
        loss = ((1 - eps) * -logp.gather(1, (t_all - 1).view(-1, 1)).squeeze(1) + eps * -logp.mean(1)).mean()
    loss.backward()
    ranks, tops = [], []
    with torch.no_grad():
        for h, t, (rows, items) in zip(case["hidden"], case["targets"], case["seen"], strict=True):
            scores = h @ case["table"].t() + mask
            keep = scores.gather(1, t.view(-1, 1))
            scores[rows, items] = float("-inf")
            ranks.append(target_ranks(scores.scatter(1, t.view(-1, 1), keep), t))
            masked = h @ case["table"].t() + mask
            masked[rows, items] = float("-inf")
            tops.append(masked.topk(5, dim=1))
    return {"loss": loss.detach(), "table_grad": table.grad, "hidden_grad": [h.grad for h in hidden], "ranks": ranks, "tops": tops}


def _sharded(splits: list[int], chunk: int | None, eps: float = 0.0) -> dict[str, Any]:
    """Rank r holds rows [sum(splits[:r]), sum(splits[:r + 1])) (0 rows: none); ``chunk``: logits
    elements computed at once (small: several chunks of rows)."""
    import torch.distributed as dist

    from lightning_hybrid.parallel import tied_output
    from lightning_hybrid.parallel.tied_output import (
        TableRows,
        sharded_cross_entropy,
        sharded_target_ranks,
        sharded_top_k,
    )

    if chunk is not None:
        tied_output.CHUNK_ELEMENTS = chunk

    rank, world = dist.get_rank(), dist.get_world_size()
    case = _case(world)
    offset = sum(splits[:rank])
    weight = case["table"][offset : offset + splits[rank]].clone().requires_grad_(True)
    rows = TableRows(weight, offset, V, dist.group.WORLD)
    hidden = case["hidden"][rank].clone().requires_grad_(True)
    targets = case["targets"][rank]
    total = sum(len(t) for t in case["targets"])
    # each rank's mean loss times its share of the global targets (loss_normalization="global_tokens")
    per_row = sharded_cross_entropy(hidden, targets, rows, eps)
    (per_row.mean() * (len(targets) * world / total)).backward()
    loss = per_row.detach().sum().clone()
    dist.all_reduce(loss)
    ranks = sharded_target_ranks(case["hidden"][rank], targets, rows, case["seen"][rank])
    values, items = sharded_top_k(case["hidden"][rank], rows, 5, case["seen"][rank])
    return {"loss": loss / total, "weight_grad": weight.grad, "offset": offset, "hidden_grad": hidden.grad, "ranks": ranks,
            "top_values": values, "top_items": items}


@pytest.mark.parametrize(
    ("splits", "chunk", "eps"),
    [([12, 11], None, 0.0), ([6, 6, 6, 5], 13, 0.0), ([23, 0], None, 0.0), ([6, 6, 6, 5], 13, 0.2)],
    ids=["row_wise-2", "row_wise-4-uneven-chunked", "table_wise-2", "row_wise-4-label-smoothing"],
)
def test_shard_parallel_softmax_equals_the_full_one(splits: list[int], chunk: int | None, eps: float) -> None:
    world = len(splits)
    reference = _reference(_case(world), eps)
    for rank, result in enumerate(run_distributed(_sharded, world, splits, chunk, eps, timeout_s=120)):
        assert_close(result["loss"], reference["loss"], rtol=1e-5, atol=1e-6)
        start = result["offset"]
        # the table's gradient: the one-process gradient of the mean over the global batch
        assert_close(result["weight_grad"], reference["table_grad"][start : start + splits[rank]], rtol=1e-5, atol=1e-6)
        # the hidden states' gradient is the rank's share before data parallelism averages (x world)
        assert_close(result["hidden_grad"] / world, reference["hidden_grad"][rank], rtol=1e-5, atol=1e-6)
        assert torch.equal(result["ranks"], reference["ranks"][rank])
        assert_close(result["top_values"], reference["tops"][rank].values)
        assert torch.equal(result["top_items"], reference["tops"][rank].indices)


def test_one_process_and_error_messages() -> None:
    from lightning_hybrid.models.sasrec import SASRec
    from lightning_hybrid.parallel.tied_output import sharded_cross_entropy, table_rows

    case = _case(1)
    reference = _reference(case)
    table = torch.nn.ModuleDict({"item_id": torch.nn.Embedding(V, D)})
    table["item_id"].weight.data.copy_(case["table"])
    loss = sharded_cross_entropy(case["hidden"][0], case["targets"][0], table_rows(table, "item_id")).mean()
    assert_close(loss, reference["loss"])
    smoothed = sharded_cross_entropy(case["hidden"][0], case["targets"][0], table_rows(table, "item_id"), 0.2).mean()
    assert_close(smoothed, _reference(case, 0.2)["loss"])
    with pytest.raises(ValueError, match="smooths the full softmax only"):
        SASRec(num_items=5, loss="sampled", label_smoothing=0.1)
    with pytest.raises(ValueError, match="tied output is scored through the sharded item table"):
        SASRec(num_items=5, output="tied", tensor_parallel_output="vocab_parallel")


def test_tied_output_asks_for_the_dense_kernel_and_refuses_a_contradiction() -> None:
    from lightning_hybrid.models.sasrec import SASRec
    from lightning_hybrid.parallel.embedding import EmbeddingShardingSpec
    from lightning_hybrid.strategies.tables import _with_model_kernels

    tied, separate = SASRec(num_items=5, output="tied"), SASRec(num_items=5)
    assert _with_model_kernels(tied, EmbeddingShardingSpec()).compute_kernels == {"item_id": "dense"}
    assert _with_model_kernels(separate, EmbeddingShardingSpec()).compute_kernels == {}
    with pytest.raises(ValueError, match=r"embedding_kernels=\{'item_id': 'fused'\}\) contradicts the model"):
        _with_model_kernels(tied, EmbeddingShardingSpec(compute_kernels={"item_id": "fused"}))


DATA = dict(format="synthetic", max_len=8, synthetic_users=24, synthetic_items=30, synthetic_min_len=4, synthetic_max_len=12, seed=2)


def _fit(devices: int, tp: int = 1) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import LossRecorder, quiet_trainer, sgd_sasrec_class

    torch.manual_seed(0)
    model = sgd_sasrec_class()(num_items=30, max_len=8, d_model=16, num_blocks=2, num_heads=2, dropout=0.0, output="tied", top_k=5)
    record = LossRecorder()
    # no embedding_kernels: the model's table_kernels() puts the tied table on the dense kernel
    strategy = HybridStrategy(embedding_sharding={"item_id": "row_wise"}, tensor_parallel=tp) if devices > 1 else "auto"
    trainer = quiet_trainer(strategy=strategy, devices=devices, max_epochs=3, callbacks=[record], num_sanity_val_steps=0)
    data = SequenceDataModule(**DATA, batch_size=24 * tp // devices)
    trainer.fit(model, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    state = full_state_dict(model) if devices > 1 else {k: v.detach().clone() for k, v in model.state_dict().items()}
    predictions = trainer.predict(model, datamodule=data)
    with torch.no_grad():  # the rows the tied sampled softmax reads, through the (sharded) table's own lookup
        looked_up = model._item_rows(torch.arange(1, 31))
    return {"looked_up": looked_up, "losses": record.losses, "state": state, "metrics": metrics,
            "predicted": {int(u): i.tolist() for p in predictions for u, i in zip(p["user"], p["items"], strict=True)}}


@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_tied_sasrec_on_a_sharded_table_trains_evaluates_and_predicts_like_one_process(tp: int) -> None:
    reference = _fit(1)
    assert "output.weight" not in reference["state"]  # no second copy of the catalogue
    ranks = run_distributed(_fit, 2, 2, tp, init_process_group=False, timeout_s=300)
    replicas = ranks[:: tp]  # (tp ranks of one replica report the same loss)
    mean = [sum(r["losses"][i] for r in replicas) / len(replicas) for i in range(len(reference["losses"]))]
    assert_close(torch.tensor(mean), torch.tensor(reference["losses"]), rtol=1e-4, atol=1e-5)
    assert set(ranks[0]["state"]) == set(reference["state"])  # (rank 0 gathers the whole state)
    for key, value in reference["state"].items():
        assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    table = next(k for k in reference["state"] if "item_id" in k)
    for result in ranks:
        assert_close(result["looked_up"], ranks[0]["state"][table][1:31])
        assert set(result["metrics"]) == set(reference["metrics"]) and result["metrics"]
        for key, value in reference["metrics"].items():
            assert result["metrics"][key] == pytest.approx(value, abs=1e-6), key
    predicted = {**ranks[0]["predicted"], **ranks[1]["predicted"]}
    assert predicted == reference["predicted"]
    if tp > 1:
        assert ranks[0]["predicted"] == ranks[1]["predicted"]  # one replica: both ranks rank the same users
