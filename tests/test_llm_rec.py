"""Tier 2: LLMRec, the reference recommender on a Hugging Face decoder, under HybridStrategy.

With no plan or spec written: ``tensor_parallel=2`` splits the decoder by its config's own
``base_model_tp_plan`` and ``pipeline_parallel=2`` cuts its layers into stages; both must train
like one process (losses and parameters after the steps, SGD), and under the pipeline the
model's own validation gives the single-process metrics.
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

DATA = dict(format="synthetic", max_len=8, batch_size=64, synthetic_users=24, synthetic_items=30, synthetic_min_len=10, synthetic_max_len=10, seed=2)
BACKBONES = {
    "llama": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16},
    "qwen2": {"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16},
}


def _fit(arch: str, strategy_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.llm_rec import LLMRec
    from lightning_hybrid.optim import GroupedOptimizer
    from tests.helpers import LossRecorder, quiet_trainer

    class SGDLLMRec(LLMRec):  # SGD: exact on the fused table and comparable step by step
        def configure_optimizers(self) -> Any:
            tables = {id(p) for p in self.item_tables.parameters()}
            return GroupedOptimizer([
                torch.optim.SGD([p for p in self.parameters() if id(p) not in tables], lr=0.5),
                torch.optim.SGD(list(self.item_tables.parameters()), lr=0.1),
            ])

    torch.manual_seed(0)
    model = SGDLLMRec(backbone=BACKBONES[arch], num_items=30, max_len=8)
    recorder = LossRecorder()
    common = dict(max_epochs=3, num_sanity_val_steps=0, check_val_every_n_epoch=100, callbacks=[recorder])
    if strategy_kwargs is None:
        trainer = quiet_trainer(devices=1, **common)
    else:
        trainer = quiet_trainer(strategy=HybridStrategy(**strategy_kwargs), devices=2, **common)
    data = SequenceDataModule(**DATA)
    trainer.fit(model, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.validate(model, datamodule=data, verbose=False)[0].items()}
    state = full_state_dict(model) if strategy_kwargs is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": recorder.losses, "state": state, "metrics": metrics}


def _fit_both() -> dict[str, Any]:
    return {
        "tp2": _fit("llama", {"tensor_parallel": 2, "embedding_sharding": {"item_id": "row_wise"}}),
        "pp2": _fit("qwen2", {"pipeline_parallel": 2, "pipeline_schedule": "1f1b", "embedding_sharding": {"item_id": "row_wise"}}),
    }


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_distributed(_fit_both, 2, init_process_group=False, timeout_s=600)


@pytest.mark.parametrize(("layout", "arch"), [("tp2", "llama"), ("pp2", "qwen2")])
def test_llm_rec_without_a_plan_matches_one_process(layout: str, arch: str, results: list[dict[str, Any]]) -> None:
    reference = _fit(arch, None)
    ranks = [r[layout] for r in results]
    for rank in ranks:
        assert_close(torch.tensor(rank["losses"]), torch.tensor(reference["losses"]), rtol=1e-4, atol=1e-5)
        # the model's own validation_step, under tp or the pipeline: the single-process metrics
        for key, value in reference["metrics"].items():
            assert rank["metrics"][key] == pytest.approx(value, abs=1e-6), key
    state = ranks[0]["state"]
    assert set(state) == set(reference["state"])
    for key, value in reference["state"].items():
        assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def _tiny_backbone_dir(root: str) -> tuple[str, list[str]]:
    """A word-level tokenizer over the synthetic items' words and a tiny Llama with that vocabulary,
    saved locally together (built offline: nothing is downloaded)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[PAD]", *(f"genre{i}" for i in range(20)), *(f"style{i}" for i in range(13))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    config = transformers.AutoConfig.for_model(**{**BACKBONES["llama"], "vocab_size": len(words)})
    torch.manual_seed(3)
    transformers.AutoModel.from_config(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root, words


def _fit_text(root: str, strategy_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.llm_rec import LLMRec
    from tests.helpers import LossRecorder, quiet_trainer

    torch.manual_seed(0)
    model = LLMRec(backbone=root, num_items=30, max_len=8, text_tower=True, table_optimizer="adagrad")
    recorder = LossRecorder()
    common = dict(max_epochs=2, limit_val_batches=0, callbacks=[recorder])
    trainer = quiet_trainer(devices=1, **common) if strategy_kwargs is None else quiet_trainer(
        strategy=HybridStrategy(**strategy_kwargs), devices=2, **common)
    data = SequenceDataModule(**{**DATA, "batch_size": 24 if strategy_kwargs is None else 12}, item_text=True, text_len=4, text_tokenizer=root)
    trainer.fit(model, datamodule=data)
    state = full_state_dict(model) if strategy_kwargs is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": recorder.losses, "state": state, "tokens": data.item_text_tokens}


def test_item_text_through_the_backbone_s_own_tokenizer(tmp_path: Any) -> None:
    """SequenceDataModule(text_tokenizer=<backbone dir>) tokenizes item text with the backbone's
    tokenizer (ids + 1, 0 = padding); LLMRec(text_tower=True) starts its token table from the
    backbone's token embedding; dp=2 with both tables sharded trains like one process."""
    import transformers

    root, words = _tiny_backbone_dir(str(tmp_path))
    one = _fit_text(root, None)
    # item 8's synthetic text is "genre8 style1": its tokenizer ids, shifted by one
    assert one["tokens"][8].tolist() == [words.index("genre8") + 1, words.index("style1") + 1, 0, 0]
    # the token table started as the backbone's token embedding (Adagrad moved it: compare untrained)
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.llm_rec import LLMRec

    fresh = LLMRec(backbone=root, num_items=30, max_len=8, text_tower=True)
    data = SequenceDataModule(**DATA, item_text=True, text_len=4, text_tokenizer=root)
    fresh._build_text_tower(data.item_text_tokens, data.text_vocab_size)
    embed = transformers.AutoModel.from_pretrained(root, local_files_only=True).embed_tokens.weight
    table = fresh.text_tables.embeddings["text_token"].weight
    assert torch.equal(table[1:], embed.detach()) and not table[0].any()
    ranks = run_distributed(_fit_text, 2, root, {"embedding_sharding": {"item_id": "row_wise", "text_token": "row_wise"}},
                            init_process_group=False, timeout_s=300)
    steps = torch.stack([torch.tensor(r["losses"]) for r in ranks]).mean(0)
    assert_close(steps, torch.tensor(one["losses"]), rtol=1e-4, atol=1e-5)
    for key, value in one["state"].items():
        # an attention key bias has an exact gradient of zero (softmax ignores a shift shared by all
        # keys): Adam turns its rounding noise into lr-sized steps, so only its size is compared
        tol = dict(rtol=0.0, atol=5e-3) if key.endswith(".k.bias") else dict(rtol=1e-4, atol=1e-5)
        assert_close(ranks[0]["state"][key], value, **tol, msg=lambda m, k=key: f"{k}: {m}")
