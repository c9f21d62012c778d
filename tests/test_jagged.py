"""Tier 1: jagged batches compute what the padded ones do, and length-grouped sampling stays correct.

References: the padded computation (today's behaviour) for outputs, losses and gradients on the
real positions; hand-checkable counts for the sampler (every sample once per epoch across ranks,
the same batches after a resume); the log-normal's quantiles for the long-tailed generator.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.data.lengths import (
    LengthGroupedSampler,
    long_tail_lengths,
    token_balanced_split,
    trim_batch,
)
from lightning_hybrid.data.sequences import SequenceDataModule, collate_train

DATA = dict(format="synthetic", max_len=50, synthetic_users=64, synthetic_items=40, synthetic_min_len=3, synthetic_max_len=120,
            synthetic_lengths="long_tail", seed=3)


def _model(**kwargs: object):  # noqa: ANN202
    from lightning_hybrid.models.sasrec import SASRec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return SASRec(num_items=40, max_len=50, d_model=16, num_blocks=2, num_heads=2, dropout=0.0, **kwargs)


def test_jagged_batch_equals_the_padded_one_on_real_positions() -> None:
    data = SequenceDataModule(**DATA, batch_size=16)
    data.setup("fit")
    rows = [data.train_set[i] for i in range(16)]
    padded = collate_train(rows, multiple=50)  # (no trimming: 50 columns)
    jagged = collate_train(rows, multiple=8)
    width = jagged["input"].shape[1]
    assert width % 8 == 0 and width < 50 and padded["input"].shape[1] == 50
    assert not padded["input"][:, : 50 - width].any()  # only padding was dropped

    results = {}
    for name, batch, kwargs in (("padded", padded, {"padding_lookups": True}), ("jagged", jagged, {})):
        model = _model(**kwargs)
        hidden = model.encode(batch["input"])
        loss = model.training_step(batch, 0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (hidden[:, -width:][batch["input"][:, -width:] != 0], loss.detach(), grads)
    (h_pad, loss_pad, g_pad), (h_jag, loss_jag, g_jag) = results["padded"], results["jagged"]
    assert_close(h_jag, h_pad, rtol=1e-5, atol=1e-6)
    assert_close(loss_jag, loss_pad, rtol=1e-6, atol=1e-7)
    assert set(g_jag) == set(g_pad)
    for name, grad in g_pad.items():
        assert_close(g_jag[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_trim_keeps_a_multiple_and_leaves_other_tensors() -> None:
    batch = {"input": torch.tensor([[0, 0, 0, 0, 0, 1, 2], [0, 0, 0, 0, 3, 4, 5]]), "target": torch.tensor([[0] * 5 + [2, 3], [0] * 4 + [4, 5, 6]]),
             "user": torch.tensor([0, 1])}
    out = trim_batch(batch, multiple=2)
    assert out["input"].tolist() == [[0, 0, 1, 2], [0, 3, 4, 5]]
    assert out["target"].shape == (2, 4) and torch.equal(out["user"], batch["user"])


def test_length_grouped_sampler_covers_each_sample_once_and_groups_lengths() -> None:
    lengths = long_tail_lengths(203, min_len=3, max_len=200, generator=torch.Generator().manual_seed(0)).tolist()
    dataset = list(range(203))
    samplers = [LengthGroupedSampler(dataset, lengths, batch_size=8, num_replicas=2, rank=r, seed=5, group=4) for r in range(2)]
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        streams = [list(s) for s in samplers]
        assert len(streams[0]) == len(streams[1]) == 102  # ceil(203 / 2), as DistributedSampler
        seen = streams[0] + streams[1]
        assert set(seen) == set(dataset) and len(seen) - len(set(seen)) == 1  # one repeat pads 203 to 204
        # rank r's k-th batch: its token-balanced share of the k-th global batch
        batches = samplers[0].global_batches()
        for r in range(2):
            assert streams[r][:8] == token_balanced_split(batches[0], lengths, 2)[r]
    # grouped: the padding a batch of 8 carries (to its longest) is far below that of random batches
    def waste(order: list[int]) -> float:
        chunks = [order[k : k + 8] for k in range(0, len(order) - 7, 8)]
        return sum(max(lengths[i] for i in c) * len(c) - sum(lengths[i] for i in c) for c in chunks) / sum(lengths)

    random_order = torch.randperm(203, generator=torch.Generator().manual_seed(1)).tolist()
    assert waste(streams[0]) < 0.5 * waste(random_order)
    # a new epoch is a new order; the same epoch, the same order (what a resume relies on)
    samplers[0].set_epoch(1)
    again = list(samplers[0])
    samplers[0].set_epoch(2)
    assert again == streams[0] and list(samplers[0]) != again


def test_token_balanced_split_hand_computed() -> None:
    lengths = [50, 9, 8, 7, 6, 5, 1, 1]
    # longest first to the lighter rank: 50 | 9, then 8, 7, 6 to rank 1 until it is full (4), then 5, 1, 1 to rank 0
    assert token_balanced_split(range(8), lengths, 2) == [[0, 5, 6, 7], [1, 2, 3, 4]]
    # the interleaved split of a length-sorted batch gives 50+8+6+1 = 65 vs 22; balanced 57 vs 30
    # (rank 0 must take 4 samples and the 50); over 3 ranks the sizes are 3, 3, 2
    # equal lengths are dealt out in the given order (an interleaved split)
    assert token_balanced_split([5, 2, 7, 1], [3] * 8, 2) == [[5, 7], [2, 1]]
    parts = token_balanced_split(range(8), lengths, 3)
    assert [len(p) for p in parts] == [3, 3, 2] and sorted(i for p in parts for i in p) == list(range(8))
    # on long-tailed lengths, tokens per rank within 1% over 4 ranks (a batch of 256)
    tail = long_tail_lengths(1024, min_len=3, max_len=200, generator=torch.Generator().manual_seed(0)).tolist()
    split = token_balanced_split(range(256), tail, 4)
    sums = [sum(tail[i] for i in p) for p in split]
    assert max(sums) / (sum(sums) / 4) <= 1.01 and all(len(p) == 64 for p in split)


def test_the_default_training_batches_are_uniformly_random() -> None:
    """``length_group=1`` (the data module's default): each global batch holds the samples of one
    consecutive slice of the epoch's seeded permutation (the reference: torch.randperm with seed +
    epoch), whatever their lengths; grouping is refused for padded batches, naming the fix."""
    data = SequenceDataModule(**DATA, batch_size=8)
    assert data.length_group == 1
    data.setup("fit")
    n = len(data.train_set)
    sampler = data.train_dataloader().sampler
    sampler.set_epoch(2)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(sampler.seed + 2)).tolist()
    slices = [set(order[k : k + 8]) for k in range(0, n - n % 8, 8)]
    batches = [set(b) for b in sampler.global_batches() if len(b) == 8]
    assert sorted(map(sorted, batches)) == sorted(map(sorted, slices))
    with pytest.raises(ValueError, match=r"length_group=32, batching='padded'.*length_group=1"):
        SequenceDataModule(**DATA, batching="padded", length_group=32)


def test_length_grouped_loader_resumes_mid_epoch_with_the_same_batches() -> None:
    data = SequenceDataModule(**DATA, batch_size=8)
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.set_epoch(3)
    full = [b["input"].clone() for b in loader]
    resumed = data.train_dataloader()
    resumed.sampler.set_epoch(3)
    resumed.load_state_dict({"batches_done": 3})
    rest = [b["input"] for b in resumed]
    assert len(rest) == len(full) - 3
    for a, b in zip(rest, full[3:], strict=True):
        assert torch.equal(a, b)


def test_long_tail_lengths_are_beauty_like() -> None:
    lengths = long_tail_lengths(20000, min_len=5, max_len=204, generator=torch.Generator().manual_seed(0)).double()
    assert 5.5 <= lengths.median() <= 7 and 7.5 <= lengths.mean() <= 10
    assert 36 <= torch.quantile(lengths, 0.99) <= 50 and lengths.max() <= 204


def _fit_tokens(strategy_kwargs: dict | None, normalization: str) -> dict:
    import os

    import lightning.pytorch as pl

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from tests.helpers import LossRecorder, quiet_trainer, sgd_sasrec_class

    tokens: list[tuple[int, float | None]] = []  # per step: this rank's real tokens, the logged max/mean over ranks

    class Tokens(pl.Callback):  # (after the monitor: this step's numbers)
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            last = next((c.last for c in trainer.callbacks if type(c).__name__ == "HybridMonitor"), {})
            tokens.append((int((batch["input"] != 0).sum()), last.get("utilization/token_imbalance")))

    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    torch.manual_seed(0)
    model = sgd_sasrec_class()(num_items=40, max_len=50, d_model=16, num_blocks=2, num_heads=2, dropout=0.0, loss_normalization=normalization)
    # every user in each global batch; random (padded) batching: the ranks hold different numbers of targets
    data = SequenceDataModule(**{**DATA, "synthetic_users": 24, "synthetic_min_len": 5}, batch_size=24 if strategy_kwargs is None else 12, batching="padded")
    devices = 1 if strategy_kwargs is None else 2
    strategy = "auto" if strategy_kwargs is None else HybridStrategy(**strategy_kwargs)
    from lightning_hybrid.callbacks import HybridMonitor

    callbacks = [LossRecorder(), HybridMonitor(), Tokens()]
    trainer = quiet_trainer(strategy=strategy, devices=devices, max_epochs=3, limit_val_batches=0, callbacks=callbacks, log_every_n_steps=1)
    trainer.fit(model, datamodule=data)
    state = full_state_dict(model) if strategy_kwargs is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"state": state, "tokens": tokens}


def _dp2_both() -> dict:
    return {n: _fit_tokens({"embedding_sharding": {"item_id": "row_wise"}}, n) for n in ("global_tokens", "epoch_tokens", "per_rank")}


def test_global_token_normalisation_makes_dp_equal_one_process() -> None:
    """dp=2 on long-tailed sequences split at random (unequal targets per rank): with the loss
    normalised over the global batch's targets (or the epoch's, the same here) the parameters
    equal one process on that batch; each rank's own mean (per_rank) does not."""
    from lightning_hybrid.testing import run_distributed

    reference = _fit_tokens(None, "global_tokens")["state"]
    ranks = run_distributed(_dp2_both, 2, init_process_group=False, timeout_s=300)
    # (every user in each global batch: the epoch's mean targets per global batch are this batch's,
    # so epoch_tokens, with no collective, must land on the same parameters)
    for normalization in ("global_tokens", "epoch_tokens"):
        exact = ranks[0][normalization]["state"]
        for key, value in reference.items():
            assert_close(exact[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key, n=normalization: f"{n} {k}: {m}")
    per_rank = ranks[0]["per_rank"]["state"]
    assert max(float((per_rank[k] - v).abs().max()) for k, v in reference.items()) > 1e-3
    # utilization/token_imbalance: max/mean of the two ranks' real tokens, logged on both ranks
    steps = [(a, b) for a, b in zip(ranks[0]["global_tokens"]["tokens"], ranks[1]["global_tokens"]["tokens"], strict=True)]
    assert len(steps) == 3 and any(a[0] != b[0] for a, b in steps)
    for (t0, logged0), (t1, logged1) in steps:
        assert logged0 == logged1 == pytest.approx(max(t0, t1) / ((t0 + t1) / 2))


def _epoch_losses(normalization: str, batch_size: int, batching: str) -> list[float]:
    """The training losses of one epoch at fixed weights (lr 0, no dropout), one process."""
    from tests.helpers import LossRecorder, quiet_trainer

    model = _model(loss="full", lr=0.0, table_lr=0.0, loss_normalization=normalization)
    data = SequenceDataModule(**DATA, batch_size=batch_size, batching=batching)
    recorder = LossRecorder()
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[recorder], log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
    return recorder.losses


def test_epoch_token_normalisation_weighs_every_target_alike_under_length_grouping() -> None:
    """Length-grouped batches of long-tailed sequences: with ``epoch_tokens`` the epoch's losses
    sum to (batches x the mean over every target of the epoch), the objective of uniformly
    shuffled batches (the reference: one batch holding every user); each batch's own mean
    (``global_tokens``) weighs the short batches' few targets up and misses it."""
    reference = _epoch_losses("global_tokens", 64, "padded")
    assert len(reference) == 1
    for normalization in ("epoch_tokens", "global_tokens"):
        losses = _epoch_losses(normalization, 2, "jagged")  # (46 training sequences: 23 full batches)
        assert len(losses) == 23
        if normalization == "epoch_tokens":
            assert sum(losses) / len(losses) == pytest.approx(reference[0], rel=1e-5)
        else:
            assert abs(sum(losses) / len(losses) - reference[0]) > 0.01 * reference[0]


def test_epoch_targets_per_sequence_counts_the_training_targets() -> None:
    """Hand count: users of 7, 3 and 2 interactions. The last two are held out when a user has 3 or
    more, so they train on 5, 1 and 2 items: 4 targets, none (the user trains on nothing) and 1,
    mean 2.5; at max_len 2 the first user's targets are cut to 2, mean 1.5."""
    import pathlib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "lines.txt"
        path.write_text("1 1 2 3 4 5 6 7\n2 1 2 3\n3 4 5\n")
        assert SequenceDataModule(format="sasrec", path=str(path), max_len=50).train_targets_per_sequence() == pytest.approx(2.5)
        assert SequenceDataModule(format="sasrec", path=str(path), max_len=2).train_targets_per_sequence() == pytest.approx(1.5)


def test_rows_balanced_over_shards_even_out_the_lookups_each_shard_serves() -> None:
    """Popularity-skewed ids (Zipf, popular items first, as ids often are): counted from the
    training batches' ids, the row-wise shards serve over 1.2x the mean on raw rows and within 10%
    after the remap; the remap keeps every raw id and is what the checkpoint mapping records."""
    kwargs = dict(format="synthetic", max_len=50, synthetic_users=400, synthetic_items=200, synthetic_min_len=5,
                  synthetic_max_len=60, seed=1, batch_size=32)

    def served(data: SequenceDataModule, shards: int) -> float:
        data.setup("fit")
        block = -(-(data.num_items + 1) // shards)
        counts = torch.zeros(shards)
        for batch in data.train_dataloader():
            ids = batch["input"][batch["input"] != 0]
            counts += torch.bincount(ids // block, minlength=shards).float()
        return float(counts.max() / counts.mean())

    for shards in (2, 4):
        raw = SequenceDataModule(**kwargs)
        balanced = SequenceDataModule(**kwargs, row_balance_shards=shards)
        assert served(raw, shards) > 1.2
        assert served(balanced, shards) <= 1.10
        assert sorted(balanced.load().item_ids) == sorted(raw.load().item_ids)
        assert balanced.state_dict()["item_ids"] == list(balanced.load().item_ids) != list(raw.load().item_ids)


def test_epoch_tokens_without_the_data_modules_count_warns_and_a_bad_count_is_refused() -> None:
    from lightning_hybrid.models.losses import epoch_targets_per_sequence

    with pytest.warns(UserWarning, match=r"has no train_targets_per_sequence\(\).*'global_tokens'"):
        assert epoch_targets_per_sequence(object()) == 0.0

    class Empty:
        def train_targets_per_sequence(self) -> float:
            return 0.0

    with pytest.raises(ValueError, match=r"Empty.train_targets_per_sequence\(\) returned 0.0"):
        epoch_targets_per_sequence(Empty())
