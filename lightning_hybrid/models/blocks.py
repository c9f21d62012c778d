"""The causal transformer block of the sequential recommenders, in the two layouts published for SASRec.

``layout="pre_norm"`` is today's transformer (GPT-2 style): each sub-layer reads a normalised
copy of the residual stream and adds its output to the stream, GELU MLP. ``layout="sasrec"`` is
the block of the SASRec paper (Kang & McAuley, 2018) as its authors' code and RecTools'
``SASRecTransformerLayer`` run it: the queries are normalised but the keys and values read the raw
stream, the attention output is added to the *normalised* queries, and the ReLU feed-forward's
output is added to its normalised input. The published Amazon results (eSASRec, S3Rec) use it.
``layout="ligr"`` is LinkedIn's LiGR layer (arXiv 2502.03417), eSASRec's transformer: pre-norm
sub-layers whose outputs enter the stream through a learned sigmoid gate of the stream itself
(``x + sigmoid(W x) * sublayer(norm(x))``), and a SwiGLU feed-forward without biases.

All layouts keep the projection names ``q``, ``k``, ``v``, ``out``, ``up``, ``down`` (LiGR adds the
SwiGLU's ``gate``, split like ``up``, and the residual gates ``attn_gate``/``mlp_gate``, which read
the whole stream and stay replicated), so one tensor-parallel plan
(`lightning_hybrid.parallel.tensor.reference_plan`, ``gated=True`` for LiGR) splits each.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

LAYOUTS = ("pre_norm", "sasrec", "ligr")


class CausalSelfAttentionBlock(nn.Module):
    """Causal multi-head self-attention, then a two-layer MLP, in the given ``layout``."""

    def __init__(
        self, d_model: int, num_heads: int, mlp_hidden: int, dropout: float, *, layout: Literal["pre_norm", "sasrec", "ligr"] = "pre_norm"
    ) -> None:
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}.")
        if layout not in LAYOUTS:
            raise ValueError(f"CausalSelfAttentionBlock(layout={layout!r}): use one of {LAYOUTS}.")
        self.num_heads = num_heads
        self.layout = layout
        self.attn_norm = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.mlp_norm = nn.LayerNorm(d_model)
        ligr = layout == "ligr"
        self.up = nn.Linear(d_model, mlp_hidden, bias=not ligr)
        self.down = nn.Linear(mlp_hidden, d_model, bias=not ligr)
        if ligr:
            self.gate = nn.Linear(d_model, mlp_hidden, bias=False)  # SwiGLU: down(silu(gate(h)) * up(h))
            self.attn_gate = nn.Linear(d_model, d_model)  # residual gates, read from the raw stream
            self.mlp_gate = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def _attention(self, query_in: torch.Tensor, key_in: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        # heads from the local projection width and the length from the projections, so a
        # tensor-parallel split of q/k/v (and a sequence-parallel shard of x) keeps working
        projected = [self.q(query_in), self.k(key_in), self.v(key_in)]
        batch, length = projected[0].shape[:2]
        head_dim = query_in.shape[-1] // self.num_heads
        q, k, v = (t.view(batch, length, -1, head_dim).transpose(1, 2) for t in projected)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=attn_mask is None
        )
        return self.out(attn.transpose(1, 2).reshape(batch, length, -1))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_mask``: [B, 1, L, L] boolean (True = may attend); None means plain causal attention,
        which lets SDPA pick its fused causal kernels (no padding in the batch)."""
        if self.layout == "pre_norm":
            h = self.attn_norm(x)
            x = x + self.dropout(self._attention(h, h, attn_mask))
            return x + self.dropout(self.down(F.gelu(self.up(self.mlp_norm(x)))))
        if self.layout == "ligr":
            h = self.attn_norm(x)
            x = x + torch.sigmoid(self.attn_gate(x)) * self.dropout(self._attention(h, h, attn_mask))
            h = self.mlp_norm(x)
            swiglu = self.down(self.dropout(F.silu(self.gate(h)) * self.up(h)))
            return x + torch.sigmoid(self.mlp_gate(x)) * self.dropout(swiglu)
        # SASRec's own block: normalised queries, raw keys/values, residuals onto the normalised inputs
        q_in = self.attn_norm(x)
        x = _local(q_in) + self._attention(q_in, x, attn_mask)  # (attention dropout only, as RecTools)
        h = self.mlp_norm(x)
        return _local(h) + self.dropout(self.down(self.dropout(F.relu(self.up(h)))))


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sequence-parallel norm's output is a DTensor (sequence shard); the residual stream is its local shard."""
    return t.to_local() if isinstance(t, DTensor) else t


def causal_padding_mask(items: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] boolean mask: position i sees j <= i that is an item; every position sees itself
    (so a padded query has a defined, ignored output instead of NaN)."""
    length = items.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
    real_keys = (items != 0).unsqueeze(1)  # [B, 1, L]
    eye = torch.eye(length, dtype=torch.bool, device=items.device)
    return ((causal & real_keys) | eye).unsqueeze(1)
