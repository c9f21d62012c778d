"""Tier 2: tensor parallelism of transformer blocks (tp=2, gloo) equals the single-process model.

These test the plain functions of `lightning_hybrid.parallel.tensor`; the strategy-level 2D
integration (dp x tp with sharded embeddings) is tracked in the tensor-parallel issue.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_hybrid.testing import run_distributed


def _sasrec(block: str = "pre_norm") -> nn.Module:
    from lightning_hybrid.models.sasrec import SASRec

    torch.manual_seed(0)
    return SASRec(num_items=30, max_len=8, d_model=16, num_blocks=2, num_heads=2, mlp_ratio=2, dropout=0.0, block=block)


class EncoderModel(nn.Module):
    """Built without this package in mind: nn.TransformerEncoderLayer blocks and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


ITEMS = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9], [0, 0, 0, 0, 0, 0, 11, 12]])
FEATURES = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))


def _loss(kind: str, model: nn.Module) -> torch.Tensor:
    if kind == "sasrec":
        return model.training_step({"input": ITEMS, "target": torch.roll(ITEMS, -1, 1)}, 0)
    return model(FEATURES).pow(2).mean()


def _run(kind: str, tp: bool, sequence_parallel: bool = False, block: str = "pre_norm") -> dict[str, Any]:
    warnings.simplefilter("ignore")
    model = _sasrec(block) if kind == "sasrec" else EncoderModel()
    lengths: list[int] = []
    if kind == "sasrec":
        model.blocks[1].mlp_norm.register_forward_hook(lambda _m, _a, out: lengths.append(_local(out).shape[1]))
        model.log = lambda *a, **k: None  # type: ignore[method-assign]  # no Trainer here
    if tp:
        from torch.distributed.device_mesh import init_device_mesh

        from lightning_hybrid.parallel.tensor import apply_tensor_parallel, reference_plan

        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        plan = reference_plan(sequence_parallel=sequence_parallel, num_blocks=2, gated=block == "ligr") if kind == "sasrec" else {"layers.*.linear1": "colwise", "layers.*.linear2": "rowwise"}
        apply_tensor_parallel(model, mesh["tp"], plan)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    first_grads: dict[str, torch.Tensor] = {}
    for step in range(2):
        loss = _loss(kind, model)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            first_grads = {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        losses.append(float(loss))
    return {"losses": losses, "grads": first_grads, "params": {n: _full(p.detach()) for n, p in model.named_parameters()}, "lengths": lengths}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).clone()


@pytest.mark.parametrize(
    "kind",
    ["sasrec", "sasrec_sequence_parallel", "sasrec_block_layout", "sasrec_block_layout_sequence_parallel", "sasrec_ligr", "encoder_layer_user_plan"],
)
def test_tp2_matches_single_process(kind: str) -> None:
    name = "encoder" if kind.startswith("encoder") else "sasrec"
    sequence_parallel = kind.endswith("sequence_parallel")
    # SASRec paper's block (keys/values read the raw stream); LiGR (gated residuals, SwiGLU's gate split like up)
    block = "sasrec" if "block_layout" in kind else "ligr" if kind.endswith("ligr") else "pre_norm"
    reference = _run(name, False, False, block)
    for result in run_distributed(_run, 2, name, True, sequence_parallel, block, timeout_s=120):
        if name == "sasrec":  # inside the stack the residual stream is split along the sequence, or not
            assert set(result["lengths"]) == {4 if sequence_parallel else 8}
        assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-6)
        assert set(result["grads"]) == set(reference["grads"])
        for key, grad in reference["grads"].items():
            assert_close(result["grads"][key], grad, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"grad {k}: {m}")
        for key, param in reference["params"].items():
            assert_close(result["params"][key], param, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"param {k}: {m}")


def _bad(case: str) -> str:
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_hybrid.parallel.tensor import apply_tensor_parallel, reference_plan

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    if case == "pattern":
        model, plan = EncoderModel(), {"layers.*.fc1": "colwise"}
    elif case == "sequence":
        model = _sasrec()
        apply_tensor_parallel(model, mesh["tp"], reference_plan(sequence_parallel=True, num_blocks=2))
        try:
            model.encode(ITEMS[:, 1:])  # length 7 over tp=2
        except ValueError as err:
            return str(err)
        return "no error"
    else:
        from lightning_hybrid.models.sasrec import SASRec

        model, plan = SASRec(num_items=10, max_len=4, d_model=12, num_heads=3), reference_plan()
    try:
        apply_tensor_parallel(model, mesh["tp"], plan)
    except ValueError as err:
        return str(err)
    return "no error"


def _bad_all(cases: list[str]) -> list[str]:
    return [_bad(case) for case in cases]


def test_plan_errors_are_clear_on_every_rank() -> None:
    for pattern, sequence, heads in run_distributed(_bad_all, 2, ["pattern", "sequence", "heads"], timeout_s=60):
        assert "pattern 'layers.*.fc1' matches no module of EncoderModel" in pattern
        assert "needs the sequence length (7) to be divisible by 2" in sequence
        assert "number of heads of blocks.0 (3) to be divisible by 2" in heads


# ---------------------------------------------------------------------------------------------
# Through the Trainer: HybridStrategy(tensor_parallel=2) with a sharded item table
# ---------------------------------------------------------------------------------------------

# 24 users of equal length in one batch: neither the shuffled order nor the split over dp replicas
# can change the mean loss
TP_DATA = dict(format="synthetic", max_len=8, batch_size=64, synthetic_users=24, synthetic_items=30, synthetic_min_len=10, synthetic_max_len=10, seed=2)


def _recording_classes() -> tuple[type, type]:
    from lightning_hybrid.models.sasrec import SASRec

    class RecordingSASRec(SASRec):
        """The reference model, keeping every training loss in ``recorded``."""

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.__dict__.setdefault("recorded", []).append(float(loss.detach()))
            return loss

    from tests.helpers import sgd_sasrec_class

    class SGDRecordingSASRec(sgd_sasrec_class(), RecordingSASRec):  # type: ignore[misc]
        """SGD everywhere (see tests.helpers.sgd_sasrec_class), recording every training loss."""

    return RecordingSASRec, SGDRecordingSASRec


def _fit_sasrec(
    tensor_parallel: int, devices: int | None = None, clip: float = 0.0, dense: str = "ddp", options: dict[str, Any] | None = None
) -> dict[str, Any]:
    import os

    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import quiet_trainer

    _, SGDRecordingSASRec = _recording_classes()
    torch.manual_seed(0)
    model = SGDRecordingSASRec(num_items=30, max_len=8, d_model=16, num_blocks=2, num_heads=2, mlp_ratio=2, dropout=0.0, **(options or {}))
    if (devices or tensor_parallel) > 1:
        from lightning_hybrid import HybridStrategy

        trainer = quiet_trainer(
            strategy=HybridStrategy(tensor_parallel=tensor_parallel, dense_parallel=dense), devices=devices or tensor_parallel, max_epochs=3,
            limit_val_batches=0, gradient_clip_val=clip or None,
        )
    else:
        trainer = quiet_trainer(devices=1, max_epochs=3, limit_val_batches=0, gradient_clip_val=clip or None)
    trainer.fit(model, datamodule=SequenceDataModule(**TP_DATA))
    state = full_state_dict(model) if (devices or tensor_parallel) > 1 else {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": model.recorded, "state": state, "step": trainer.global_step, "tp_bytes": getattr(trainer.strategy, "tp_bytes_last_step", 0)}


SP_VOCAB = {"sequence_parallel": True, "tensor_parallel_output": "vocab_parallel"}


# name -> (devices, tp, clip, dense_parallel, SASRec options)
TP_CASES: dict[str, tuple[int, int, float, str, dict[str, Any]]] = {
    "tp2": (2, 2, 0.0, "ddp", {}),
    "dp2xtp2": (4, 2, 0.0, "ddp", {}),
    "tp2-clipped": (2, 2, 0.05, "ddp", {}),
    "fsdp-dp2-clipped": (2, 1, 0.05, "fsdp", {}),
    "fsdp-dp2xtp2-sp-vocab-clipped": (4, 2, 0.05, "fsdp", SP_VOCAB),
    "tp2-sp-vocab": (2, 2, 0.0, "ddp", SP_VOCAB),
    "tp2-gathered-output": (2, 2, 0.0, "ddp", {"tensor_parallel_output": "gathered"}),
}


def _fit_cases(names: list[str]) -> dict[str, Any]:
    return {name: _fit_sasrec(TP_CASES[name][1], *(TP_CASES[name][i] for i in (0, 2, 3, 4))) for name in names}


@functools.cache
def _tp_results(devices: int) -> dict[str, list[dict[str, Any]]]:
    # one job per process count for all its cases: process start-up dominates these tiny fits
    names = [n for n, case in TP_CASES.items() if case[0] == devices]
    ranks = run_distributed(_fit_cases, devices, names, init_process_group=False, timeout_s=400)
    return {name: [r[name] for r in ranks] for name in names}


@pytest.mark.parametrize("name", list(TP_CASES))
def test_trainer_tensor_parallel_with_sharded_table_matches_single_process(name: str) -> None:
    devices, tp, clip, _dense, _options = TP_CASES[name]
    reference = _fit_sasrec(1, clip=clip)
    ranks = _tp_results(devices)[name]
    if name == "tp2":  # per block: q, k, v, up all-reduce their input gradient, out and down their output,
        # each [24 users, 8 positions, 16] fp32 over 2 ranks (2 * 1/2 * bytes); 2 blocks
        assert all(r["tp_bytes"] == 2 * 6 * 24 * 8 * 16 * 4 for r in ranks)
    assert reference["step"] == 3 and len(reference["losses"]) == 3
    # the ranks of one tp group hold the replicated loss of their replica's batch; ranks 0, tp, ...
    # are the dp replicas, and the mean of their losses is the global loss
    for result in ranks[:tp]:
        assert_close(torch.tensor(result["losses"]), torch.tensor(ranks[0]["losses"]))
    replicas = [r["losses"] for r in ranks[::tp]]
    mean = [sum(step) / len(step) for step in zip(*replicas, strict=True)]
    assert_close(torch.tensor(mean), torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-6)
    state = ranks[0]["state"]
    assert set(state) == set(reference["state"])
    for key, value in reference["state"].items():
        assert_close(state[key], value, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def _resume_tp(tmp: str, tensor_parallel: int, dense: str = "ddp") -> dict[str, Any]:
    import os

    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import quiet_trainer

    RecordingSASRec, _ = _recording_classes()

    def run(seed: int, epochs: int, callbacks: list[Any], ckpt: str | None) -> list[float]:
        torch.manual_seed(seed)
        model = RecordingSASRec(num_items=30, max_len=8, d_model=16, num_blocks=1, num_heads=2, dropout=0.0)
        data = SequenceDataModule(**{**TP_DATA, "batch_size": 8})
        trainer = quiet_trainer(
            strategy=HybridStrategy(tensor_parallel=tensor_parallel, dense_parallel=dense), devices=2, max_epochs=epochs, limit_val_batches=0,
            callbacks=callbacks, enable_checkpointing=bool(callbacks),
        )
        trainer.fit(model, datamodule=data, ckpt_path=ckpt)
        return model.recorded

    saver = ModelCheckpoint(dirpath=tmp, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    uninterrupted = run(0, 2, [saver], None)
    resumed = run(7, 2, [], os.path.join(tmp, "epoch=0.ckpt"))
    return {"uninterrupted": uninterrupted, "resumed": resumed}


@pytest.mark.parametrize(("tensor_parallel", "dense"), [(1, "ddp"), (2, "ddp"), (1, "fsdp")], ids=["dp2", "tp2", "fsdp-dp2"])
def test_recommender_checkpoint_resume_is_exact(tmp_path: Any, tensor_parallel: int, dense: str) -> None:
    """DTensor blocks (TP or FSDP shards), a fused EmbeddingCollection table, and a GroupedOptimizer (Adam + Adagrad)."""
    for result in run_distributed(_resume_tp, 2, str(tmp_path), tensor_parallel, dense, init_process_group=False, timeout_s=180):
        half = len(result["uninterrupted"]) // 2
        assert len(result["resumed"]) == half > 0
        assert_close(torch.tensor(result["resumed"]), torch.tensor(result["uninterrupted"][half:]), rtol=1e-6, atol=1e-7)


def _make_encoder_recommender() -> Any:
    from tests.helpers import EncoderRec

    return EncoderRec()


def _fit_encoder(devices: int, dense: str = "ddp", accumulate: int = 1) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from tests.helpers import loader, quiet_trainer

    model = _make_encoder_recommender()
    if devices == 1:
        trainer = quiet_trainer(devices=1, max_steps=3, accumulate_grad_batches=accumulate)
        trainer.fit(model, train_dataloaders=loader(16 // accumulate, n=48))
        return {"losses": model.losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    strategy = HybridStrategy(
        tensor_parallel=2,
        tensor_parallel_plan={"layers.*.linear1": "colwise", "layers.*.linear2": "rowwise"},
        dense_parallel=dense,
        embedding_sharding={"users": "row_wise", "movies": "table_wise", "cats": "data_parallel"},
    )
    trainer = quiet_trainer(strategy=strategy, devices=4, max_steps=3, accumulate_grad_batches=accumulate)
    # dp rank r of 2 gets samples r, r+2, ...: the union of both replicas' batches is the global batch
    import os

    dp_rank = int(os.environ["RANK"]) // 2
    from torch.utils.data import DataLoader, DistributedSampler

    from tests.helpers import TinyClicks, collate

    data = TinyClicks(48)
    sampler = DistributedSampler(data, num_replicas=2, rank=dp_rank, shuffle=False)
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=8 // accumulate, sampler=sampler, collate_fn=collate))
    return {"losses": model.losses, "state": full_state_dict(model)}


@pytest.mark.parametrize(("dense", "accumulate"), [("ddp", 1), ("fsdp", 2)], ids=["ddp", "fsdp-accumulate2"])
def test_user_plan_on_encoder_layers_with_sharded_tables_dp2_tp2(dense: str, accumulate: int) -> None:
    reference = _fit_encoder(1, dense, accumulate)
    ranks = run_distributed(_fit_encoder, 4, 4, dense, accumulate, init_process_group=False, timeout_s=240)
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[2]["losses"], strict=True)]
    assert_close(torch.tensor(mean), torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-6)
    for key, value in reference["state"].items():
        assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def _fit_precisions() -> dict[str, list[float]]:
    import os

    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import quiet_trainer

    RecordingSASRec, _ = _recording_classes()
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        model = RecordingSASRec(max_len=8, d_model=16, num_blocks=1, num_heads=2, dropout=0.0)
        trainer = quiet_trainer(strategy=HybridStrategy(tensor_parallel=2), devices=2, max_epochs=2, precision=precision, limit_val_batches=0)
        trainer.fit(model, datamodule=SequenceDataModule(**{**TP_DATA, "batch_size": 8}))
        losses[precision] = model.recorded
    return losses


def test_bf16_mixed_precision_with_tensor_parallelism_tracks_fp32() -> None:
    for result in run_distributed(_fit_precisions, 2, init_process_group=False, timeout_s=180):
        assert len(result["bf16-mixed"]) == len(result["32-true"]) == 6
        # autocast runs the matmuls in bf16 (8 bits of mantissa): close to, not equal to, fp32
        assert_close(torch.tensor(result["bf16-mixed"]), torch.tensor(result["32-true"]), rtol=2e-2, atol=0)
        assert result["bf16-mixed"] != result["32-true"]  # bf16 really ran


def _clip_norm_2d() -> tuple[float, float]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_hybrid.parallel.clip import clip_grad_norm_across_shards
    from lightning_hybrid.parallel.tensor import apply_tensor_parallel

    warnings.simplefilter("ignore")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(4, 3))
    apply_tensor_parallel(model, mesh["tp"], {"0": "colwise", "1": "rowwise"})
    fully_shard(model, mesh=mesh["dp"])  # 2-D: (dp strided shard, tp shard), (dp, tp), (dp,) placements
    model(torch.randn(6, 4)).pow(2).sum().backward()
    full = torch.stack([p.grad.full_tensor().norm() for p in model.parameters()]).norm()
    return float(clip_grad_norm_across_shards(list(model.parameters()), set(), 1e9)), float(full)


def test_clip_norm_counts_fsdp_and_tp_shards_once() -> None:
    for got, expected in run_distributed(_clip_norm_2d, 4, timeout_s=60):
        assert got == pytest.approx(expected, rel=1e-6)


def test_tensor_parallel_option_errors() -> None:
    from lightning_hybrid.models.sasrec import SASRec
    from lightning_hybrid.parallel.tensor import reference_plan, resolve_plan

    with pytest.raises(ValueError, match="splits the output layer, which the sampled loss reads row by row"):
        SASRec(num_items=10, loss="sampled", tensor_parallel_output="vocab_parallel")
    with pytest.raises(ValueError, match="tensor_parallel_output='sideways'"):
        SASRec(num_items=10, tensor_parallel_output="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs num_blocks"):
        reference_plan(sequence_parallel=True)
    assert reference_plan(sequence_parallel=True, num_blocks=1)["blocks.0"] == "sequence_parallel_region"  # split + gather
    with pytest.raises(ValueError, match="'blocks.0.q' is a Linear; 'sequence_parallel' applies to LayerNorm / RMSNorm / Dropout"):
        resolve_plan(_sasrec(), {"blocks.0.q": "sequence_parallel"})
    with pytest.raises(ValueError, match="matched by more than one pattern"):
        resolve_plan(_sasrec(), {"blocks.*.q": "colwise", "blocks.0.q": "colwise"})


def _fit_self_split(devices: int) -> dict[str, Any]:
    """A LightningModule that splits itself in configure_model with self.device_mesh (as under
    Lightning's ModelParallelStrategy); HybridStrategy gets tensor_parallel=2 and no plan."""
    warnings.simplefilter("ignore")
    from torch.utils.data import DataLoader, DistributedSampler

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.parallel.tensor import apply_tensor_parallel
    from tests.helpers import TinyClicks, collate, quiet_trainer

    model = _make_encoder_recommender()

    def configure_model() -> None:
        if model.device_mesh is not None and model.device_mesh["tp"].size() > 1:
            apply_tensor_parallel(model, model.device_mesh["tp"], {"layers.*.linear1": "colwise", "layers.*.linear2": "rowwise"})

    model.configure_model = configure_model  # type: ignore[method-assign]
    data = TinyClicks(48)
    loader = DataLoader(data, batch_size=16, sampler=DistributedSampler(data, num_replicas=1, rank=0, shuffle=False), collate_fn=collate)
    if devices == 1:
        quiet_trainer(devices=1, max_steps=3).fit(model, train_dataloaders=loader)
        return {"losses": model.losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    trainer = quiet_trainer(strategy=HybridStrategy(tensor_parallel=2), devices=2, max_steps=3)
    trainer.fit(model, train_dataloaders=loader)
    from torch.distributed.tensor import DTensor

    assert isinstance(model.layers[0].linear1.weight, DTensor)  # really split, by the module itself
    return {"losses": model.losses, "state": full_state_dict(model)}


def test_module_splitting_itself_in_configure_model() -> None:
    reference = _fit_self_split(1)
    ranks = run_distributed(_fit_self_split, 2, 2, init_process_group=False, timeout_s=180)
    for result in ranks:
        assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-6)
    for key, value in reference["state"].items():
        assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
