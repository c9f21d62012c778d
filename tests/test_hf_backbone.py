"""Tier 2: a user's own Hugging Face backbone under HybridStrategy, no plan written by the user.

The module is written the way a Hugging Face user writes one: a ``transformers`` decoder built
from a tiny random config and fed ``inputs_embeds``, item ids in a torchrec
``EmbeddingCollection``, a linear head over the items. With ``tensor_parallel=2`` the strategy
splits the backbone by its config's own ``base_model_tp_plan``; the losses and parameters after
the steps must equal one process, for three architectures. Skipped where ``transformers`` (an
optional extra) is not installed.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.testing import run_distributed

pytest.importorskip("transformers", reason="transformers is an optional extra (pip install -r requirements/hf.txt)")

ARCHS = ("llama", "qwen2", "mistral")
DATA = dict(format="synthetic", max_len=8, synthetic_users=16, synthetic_items=30, synthetic_min_len=10, synthetic_max_len=10, seed=2)


def _module_class() -> type:
    import lightning.pytorch as pl
    import transformers
    from torch import nn
    from torchrec import EmbeddingCollection, EmbeddingConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    class HFRec(pl.LightningModule):
        def __init__(self, arch: str, num_items: int = 30, hidden: int = 16) -> None:
            super().__init__()
            config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[arch]
            config = config_class(
                hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=8, max_position_embeddings=16, attn_implementation="eager",
            )
            torch.manual_seed(0)
            self.backbone = transformers.AutoModel.from_config(config)
            self.items = EmbeddingCollection(
                tables=[EmbeddingConfig(name="item_table", embedding_dim=hidden, num_embeddings=num_items + 1, feature_names=["item"])]
            )
            self.head = nn.Linear(hidden, num_items + 1)
            self.val_losses: list[float] = []

        def forward(self, items: torch.Tensor) -> torch.Tensor:
            batch, length = items.shape
            kjt = KeyedJaggedTensor.from_lengths_sync(
                keys=["item"], values=items.reshape(-1), lengths=torch.full((batch,), length, dtype=torch.int32)
            )
            embeds = self.items(kjt)["item"].values().view(batch, length, -1)
            hidden = self.backbone(inputs_embeds=embeds, attention_mask=(items > 0).long()).last_hidden_state
            return self.head(hidden)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            logits = self(batch["input"])
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["target"].reshape(-1), ignore_index=0)

        def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
            # plain Lightning: the same self(batch) as in training, also under a pipeline
            valid = batch["valid"]
            logits = self(batch["input"])[:, -1][valid]
            loss = nn.functional.cross_entropy(logits, batch["target"][valid])
            self.log("val_loss", loss, sync_dist=True, batch_size=logits.shape[0])
            self.val_losses.append(float(loss))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return HFRec


def _fit(arch: str, strategy_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import LossRecorder, quiet_trainer

    model = _module_class()(arch)
    recorder = LossRecorder()
    common = dict(max_epochs=3, limit_val_batches=0, callbacks=[recorder])
    if strategy_kwargs is None:
        trainer = quiet_trainer(devices=1, **common)
    else:
        trainer = quiet_trainer(strategy=HybridStrategy(**strategy_kwargs), devices=2, **common)
    trainer.fit(model, datamodule=SequenceDataModule(**DATA, batch_size=16))
    state = full_state_dict(model) if strategy_kwargs is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": recorder.losses, "state": state}


def _fit_all(strategy_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {arch: _fit(arch, strategy_kwargs) for arch in ARCHS}


def test_the_backbone_s_own_plan_is_found_and_translated() -> None:
    from lightning_hybrid.parallel.hf import tensor_parallel_plan_of

    plan = tensor_parallel_plan_of(_module_class()("llama"))
    assert plan is not None
    assert plan["backbone.layers.*.self_attn.q_proj"] == "colwise"
    assert plan["backbone.layers.*.self_attn.o_proj"] == "rowwise"
    assert plan["backbone.layers.*.mlp.down_proj"] == "rowwise"
    assert len(plan) == 7


@pytest.fixture(scope="module")
def tp2_results() -> list[dict[str, Any]]:
    return run_distributed(_fit_all, 2, {"tensor_parallel": 2, "embedding_sharding": {"item_table": "row_wise"}}, init_process_group=False, timeout_s=600)


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_parallel_from_the_model_s_own_plan_matches_one_process(arch: str, tp2_results: list[dict[str, Any]]) -> None:
    reference = _fit(arch, None)
    for rank in tp2_results:
        assert_close(torch.tensor(rank[arch]["losses"]), torch.tensor(reference["losses"]), rtol=1e-4, atol=1e-5)
    state = tp2_results[0][arch]["state"]
    assert set(state) == set(reference["state"])
    for key, value in reference["state"].items():
        assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="module")
def pp2_results() -> list[dict[str, Any]]:
    return run_distributed(_fit_all, 2, {"pipeline_parallel": 2}, init_process_group=False, timeout_s=600)


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_parallel_from_the_model_s_own_pp_plan_matches_one_process(arch: str, pp2_results: list[dict[str, Any]]) -> None:
    """No pipeline_spec(): the layers the config's base_model_pp_plan names are split, the
    module's forward routed through them; every architecture trains like one process."""
    reference = _fit(arch, None)
    for rank in pp2_results:
        assert_close(torch.tensor(rank[arch]["losses"]), torch.tensor(reference["losses"]), rtol=1e-4, atol=1e-5)
    for key, value in reference["state"].items():
        assert_close(pp2_results[0][arch]["state"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def _fit_adam(strategy_kwargs: dict[str, Any] | None, devices: int, dp: int, validate: bool = False) -> dict[str, Any]:
    """The module as a Hugging Face user writes it: Adam(self.parameters()), accumulation 2;
    with ``validate``, its plain validation_step runs after every epoch."""
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import LossRecorder, quiet_trainer

    class AdamRec(_module_class()):
        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    model = AdamRec("llama")
    recorder = LossRecorder()
    common = dict(max_epochs=3, limit_val_batches=None if validate else 0, callbacks=[recorder], accumulate_grad_batches=2)
    strategy = "auto" if strategy_kwargs is None else HybridStrategy(**strategy_kwargs)
    trainer = quiet_trainer(strategy=strategy, devices=devices, **common)
    trainer.fit(model, datamodule=SequenceDataModule(**DATA, batch_size=16 // (2 * dp)))  # the global batch: every user
    state = full_state_dict(model) if strategy_kwargs is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    kernels = {}
    if strategy_kwargs is not None and trainer.strategy.sharding_plan is not None:
        from lightning_hybrid.parallel.embedding import plan_summary

        kernels = {t: s["compute_kernel"] for t, s in plan_summary(trainer.strategy.sharding_plan).items()}
    return {"losses": recorder.losses, "state": state, "val_losses": model.val_losses, "kernels": kernels}


def _fit_adam_layouts() -> dict[str, Any]:
    # (the backbone's token embedding is unused with inputs_embeds: DDP needs to know, as with strategy="ddp")
    return {
        "dp2": _fit_adam({"find_unused_parameters": True}, 2, 2),
        "tp2": _fit_adam({"tensor_parallel": 2}, 2, 1),
        # no pipeline_spec(): the backbone's base_model_pp_plan names the layers; validation_step unchanged
        "pp2": _fit_adam({"pipeline_parallel": 2}, 2, 1, validate=True),
    }


def test_adam_and_accumulation_on_a_sequence_table_train_like_one_process() -> None:
    """strategy='hybrid' on the first try: the EmbeddingCollection table is sharded on the dense
    kernel (torch lookup on the local shards) and trains with the user's Adam and accumulation -
    equal to one process, with dp=2, with tensor_parallel=2 (the backbone's own plan) and with
    pipeline_parallel=2 (no spec: the layers split by the backbone's base_model_pp_plan, the
    module's own forward and validation_step routed through the stages)."""
    reference = _fit_adam(None, 1, 1, validate=True)
    ref_steps = torch.tensor(reference["losses"]).view(-1, 2).mean(1)
    ranks = run_distributed(_fit_adam_layouts, 2, init_process_group=False, timeout_s=600)
    for rank in ranks:  # every pp rank ran validation_step and got the one-process value
        assert len(rank["pp2"]["val_losses"]) == len(reference["val_losses"]) > 0
        assert_close(torch.tensor(rank["pp2"]["val_losses"]), torch.tensor(reference["val_losses"]), rtol=1e-4, atol=1e-5)
    for layout, replicas in (("dp2", [0, 1]), ("tp2", [0]), ("pp2", [0, 1])):
        assert ranks[0][layout]["kernels"] == {"item_table": "dense"}, layout  # sharded, the user's Adam
        steps = torch.stack([torch.tensor(ranks[r][layout]["losses"]).view(-1, 2).mean(1) for r in replicas]).mean(0)
        assert_close(steps, ref_steps, rtol=1e-4, atol=1e-5, msg=lambda m, lay=layout: f"{lay}: {m}")
        state = ranks[0][layout]["state"]
        for key, value in reference["state"].items():
            assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key, lay=layout: f"{lay} {k}: {m}")


def _fit_adam_tp2_pp2() -> dict[str, Any]:
    return _fit_adam({"tensor_parallel": 2, "pipeline_parallel": 2}, 4, 1, validate=True)


def test_tensor_and_pipeline_parallel_together_from_the_model_s_own_plans() -> None:
    """tp=2 x pp=2 on 4 processes, neither plan nor spec written: each stage's layers split by the
    backbone's base_model_tp_plan, the stages cut by its base_model_pp_plan; Adam, accumulation 2,
    plain validation_step - equal to one process."""
    reference = _fit_adam(None, 1, 1, validate=True)
    ranks = run_distributed(_fit_adam_tp2_pp2, 4, init_process_group=False, timeout_s=600)
    steps = torch.tensor(ranks[0]["losses"]).view(-1, 2).mean(1)
    assert_close(steps, torch.tensor(reference["losses"]).view(-1, 2).mean(1), rtol=1e-4, atol=1e-5)
    for rank in ranks:
        assert_close(torch.tensor(rank["val_losses"]), torch.tensor(reference["val_losses"]), rtol=1e-4, atol=1e-5)
    for key, value in reference["state"].items():
        assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def _fit_lora(strategy_kwargs: dict[str, Any] | None, devices: int, dp: int) -> dict[str, Any]:
    """LoRA on the backbone (peft), item table and head trained fully, Adam: as a user writes it."""
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from peft import LoraConfig, get_peft_model

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import LossRecorder, quiet_trainer

    class LoraRec(_module_class()):
        def __init__(self) -> None:
            super().__init__("llama")
            torch.manual_seed(1)
            self.backbone = get_peft_model(self.backbone, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    model = LoraRec()
    recorder = LossRecorder()
    strategy = "auto" if strategy_kwargs is None else HybridStrategy(**strategy_kwargs)
    trainer = quiet_trainer(strategy=strategy, devices=devices, max_epochs=3, limit_val_batches=0, callbacks=[recorder])
    try:
        trainer.fit(model, datamodule=SequenceDataModule(**DATA, batch_size=16 // dp))
    except ValueError as error:
        return {"refused": str(error)}
    state = full_state_dict(model) if strategy_kwargs is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": recorder.losses, "state": state, "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}


def _fit_lora_layouts() -> dict[str, Any]:
    return {
        "dp2": _fit_lora({"find_unused_parameters": True}, 2, 2),
        "pp2": _fit_lora({"pipeline_parallel": 2}, 2, 1),
        "tp2": _fit_lora({"tensor_parallel": 2}, 2, 1),
    }


def test_lora_through_peft_with_a_sharded_table_trains_like_one_process() -> None:
    """peft LoRA adapters on the backbone, the torchrec item table sharded: dp=2 and pp=2 (layers
    split by the base model's pp plan, inside the peft wrapper) equal one process, frozen base
    weights unchanged; tp=2 is refused naming LoRA and what composes."""
    pytest.importorskip("peft", reason="peft is an optional extra (requirements/hf.txt)")
    reference = _fit_lora(None, 1, 1)
    assert any("lora_A" in n for n in reference["trainable"]) and not any("q_proj.base_layer" in n for n in reference["trainable"])
    ranks = run_distributed(_fit_lora_layouts, 2, init_process_group=False, timeout_s=600)
    for layout in ("dp2", "pp2"):
        result = ranks[0][layout]
        steps = torch.stack([torch.tensor(r[layout]["losses"]) for r in ranks]).mean(0) if layout == "dp2" else torch.tensor(result["losses"])
        assert_close(steps, torch.tensor(reference["losses"]), rtol=1e-4, atol=1e-5, msg=lambda m, lay=layout: f"{lay}: {m}")
        for key, value in reference["state"].items():
            assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key, lay=layout: f"{lay} {k}: {m}")
    for rank in ranks:
        assert "peft (LoRA) layers" in rank["tp2"]["refused"] and "pipeline_parallel" in rank["tp2"]["refused"]
