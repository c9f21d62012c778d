"""LLMRec: the reference recommender with a Hugging Face decoder as its sequence model.

Item ids (and side features) are looked up in torchrec tables that HybridStrategy shards, exactly
as in `SASRec`; the positions then run through the decoder layers of any ``transformers`` causal
LM architecture whose layers take ``position_embeddings`` (Llama, Qwen2/3, Mistral, Gemma, ...),
built from a config written in YAML (``backbone: {model_type: llama, hidden_size: 64, ...}``) or
loaded from a local pretrained directory (``backbone: /path/to/model``; never downloaded). The
next-item loss (full or sampled softmax), full-ranking evaluation and prediction are SASRec's.

What is taken from the Hugging Face model: its decoder layers (as ``blocks``), its final norm and
its rotary embedding; its token embedding is not used (items have their own table). So
``tensor_parallel`` splits the layers by the config's own ``base_model_tp_plan`` and
``pipeline_parallel`` cuts them into stages with no plan or spec written by the user. The
attention mask is built here (causal, left padding masked), so sliding-window configs attend to
the whole window-free history; keep ``max_len`` below the window.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from lightning_hybrid.models.sasrec import SASRec


def backbone_config(backbone: dict[str, Any] | str) -> Any:
    """A ``transformers`` config from a dict with ``model_type`` (the rest are its fields) or a
    local pretrained directory."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "LLMRec needs Hugging Face transformers, an optional extra: pip install 'lightning-hybrid[hf]' "
            "(or -r requirements/hf.txt)."
        ) from error
    if isinstance(backbone, str):
        return transformers.AutoConfig.from_pretrained(backbone, local_files_only=True)
    spec = dict(backbone)
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"LLMRec(backbone={backbone!r}): give the config's model_type (e.g. 'llama', 'qwen2', 'mistral').")
    spec.setdefault("vocab_size", 8)  # (the token embedding is not used)
    return transformers.AutoConfig.for_model(model_type, **spec)


def decoder_mask(items: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive mask: each position sees itself and the real items before it."""
    length = items.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
    allowed = causal & (items != 0).unsqueeze(1) | torch.eye(length, dtype=torch.bool, device=items.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=items.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


class LLMRec(SASRec):
    """Next-item recommender: sharded item tables -> a Hugging Face decoder -> item scores.

    Args:
        backbone: the decoder: a ``transformers`` config as a dict (``model_type`` plus its
            fields, e.g. ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
            ``num_key_value_heads``, ``intermediate_size``) for random initialisation, or the
            path of a local pretrained model directory (its layer weights are loaded).
        num_items, max_len, loss, num_negatives, negative_sampling, lr, weight_decay,
        table_optimizer, table_lr, eval_ks, exclude_seen, top_k, tensor_parallel_output,
        loss_normalization: as in `SASRec`.
        text_tower, text_blocks: item text as in `SASRec` (a small encoder over each item's tokens,
            fused with its id embedding). With ``SequenceDataModule(text_tokenizer=<the backbone's
            directory>)`` the tokens are the backbone's own, and when the token table has the
            backbone's vocabulary (plus padding) it starts from the backbone's token embedding.
    """

    def __init__(
        self,
        *,
        backbone: dict[str, Any] | str,
        num_items: int | None = None,
        max_len: int = 50,
        loss: Literal["full", "sampled"] = "full",
        num_negatives: int = 256,
        negative_sampling: Literal["uniform", "popularity"] = "uniform",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        table_optimizer: Literal["adagrad", "adam"] = "adagrad",
        table_lr: float = 0.05,
        eval_ks: list[int] | None = None,
        exclude_seen: bool = False,
        top_k: int = 10,
        tensor_parallel_output: Literal["replicated", "gathered", "vocab_parallel"] = "replicated",
        text_tower: bool = False,
        text_blocks: int = 1,
        loss_normalization: Literal["epoch_tokens", "global_tokens", "per_rank"] = "epoch_tokens",
    ) -> None:
        config = backbone_config(backbone)
        super().__init__(
            num_items=num_items, max_len=max_len, d_model=int(config.hidden_size), num_blocks=1, num_heads=1, mlp_ratio=1,
            dropout=0.0, loss=loss, num_negatives=num_negatives, negative_sampling=negative_sampling, lr=lr,
            weight_decay=weight_decay, table_optimizer=table_optimizer, table_lr=table_lr, eval_ks=eval_ks,
            exclude_seen=exclude_seen, top_k=top_k, tensor_parallel_output=tensor_parallel_output,
            text_tower=text_tower, text_blocks=text_blocks, loss_normalization=loss_normalization,
        )
        # SASRec reads its structure from hparams; LightningCLI records only LLMRec's own arguments
        # (load_from_checkpoint passes LLMRec only the ones its __init__ takes)
        structure = {"mlp_ratio": 1, "dropout": 0.0, "side_features": None,
                     "sequence_parallel": False, "tables": "torchrec"}
        self.hparams.update({k: v for k, v in structure.items() if k not in self.hparams})
        # the decoder's true shape (what the planner prices)
        self.hparams.update(d_model=int(config.hidden_size), num_blocks=int(config.num_hidden_layers),
                            num_heads=int(config.num_attention_heads), mlp_ratio=max(1, int(config.intermediate_size) // int(config.hidden_size)))
        import transformers

        if isinstance(backbone, str):
            model = transformers.AutoModel.from_pretrained(backbone, local_files_only=True)
        else:
            model = transformers.AutoModel.from_config(config)
        for name in ("layers", "norm", "rotary_emb"):
            if not isinstance(getattr(model, name, None), nn.Module):
                raise ValueError(
                    f"LLMRec: {type(model).__name__} has no `{name}`; LLMRec runs decoders laid out like Llama "
                    "(layers, norm, rotary_emb), e.g. llama, qwen2, qwen3, mistral, gemma."
                )
        # SASRec's transformer parts become the decoder's (same names: pipelining, checkpoints and
        # evaluation work unchanged); SASRec's learned positions give way to the rotary embedding
        self.blocks = model.layers
        self.final_norm = model.norm
        self.rotary = model.rotary_emb
        embed = getattr(model, "embed_tokens", None)
        # the backbone's token embedding, kept (off the module) to start a text tower's token table
        self._token_embedding = [embed.weight.detach().clone()] if text_tower and isinstance(embed, nn.Embedding) else []
        del self.position, self.input_dropout
        plan = dict(getattr(config, "base_model_tp_plan", None) or {})
        self._tp_plan = {f"blocks.{k[len('layers.'):]}": v for k, v in plan.items() if k.startswith("layers.")}

    def _build_text_tower(self, tokens: torch.Tensor, vocab_size: int) -> None:
        super()._build_text_tower(tokens, vocab_size)
        table = self.text_tables.embeddings["text_token"].weight
        if self._token_embedding and tuple(self._token_embedding[0].shape) == (vocab_size - 1, table.shape[1]):
            with torch.no_grad():  # token t of the tokenizer is row t + 1 (row 0: padding)
                table[1:] = self._token_embedding[0]
                table[0] = 0.0

    def _block_input(self, emb: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return emb * (items != 0).unsqueeze(-1)

    def _block(self, block: nn.Module, x: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(items.shape[1], device=items.device).unsqueeze(0).expand(items.shape[0], -1)
        return block(
            x, attention_mask=decoder_mask(items, x.dtype), position_ids=positions, position_embeddings=self.rotary(x, positions)
        )

    def encode(self, items: torch.Tensor, user: torch.Tensor | None = None, time: torch.Tensor | None = None) -> torch.Tensor:
        x = self._block_input(self._embed(items, user, time), items)
        for block in self.blocks:
            x = self._block(block, x, items)
        return self.final_norm(x)

    def tensor_parallel_plan(self) -> dict[str, str]:
        """The decoder config's own ``base_model_tp_plan``, on ``blocks`` (translated to our styles)."""
        from lightning_hybrid.parallel.hf import HF_STYLES

        plan = {}
        for pattern, style in self._tp_plan.items():
            if style not in HF_STYLES:
                raise ValueError(f"LLMRec: the backbone's tp plan asks for {style!r} at {pattern!r}, which is not supported.")
            plan[pattern] = HF_STYLES[style]
        if not plan:
            raise ValueError("LLMRec: the backbone's config has no base_model_tp_plan; use tensor_parallel=1.")
        if self.hparams.tensor_parallel_output != "replicated":
            plan["output"] = {"gathered": "colwise_gathered", "vocab_parallel": "vocab_parallel"}[self.hparams.tensor_parallel_output]
        return plan
