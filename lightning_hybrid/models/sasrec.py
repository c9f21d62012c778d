"""A generative sequential recommender (SASRec family) as an ordinary LightningModule.

A decoder-only transformer reads a user's recent items and predicts the next one at every
position. Item ids (and optional per-position side features) live in a torchrec
`EmbeddingCollection`, so HybridStrategy shards them; the transformer blocks are plain modules
with named projections (``q``, ``k``, ``v``, ``out``; ``up``, ``down``) that tensor-parallel plans
address by name. The output layer scores every item (full softmax) or a sample of items
(sampled softmax with a logQ correction). Evaluation ranks all items for each user.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.nn import functional as F

from lightning_hybrid.metrics import RankingMetrics, target_ranks
from lightning_hybrid.models.blocks import LAYOUTS, CausalSelfAttentionBlock, causal_padding_mask
from lightning_hybrid.models.losses import (
    epoch_targets_per_sequence,
    full_softmax_loss,
    sampled_softmax_loss,
    token_share,
)
from lightning_hybrid.optim import network_and_table_optimizer
from lightning_hybrid.parallel import tied_output
from lightning_hybrid.specs import PipelineSpec, pipeline_runner, reference_plan

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchrec import EmbeddingCollection, EmbeddingConfig
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    _TORCHREC_ERROR: ImportError | None = None
except ImportError as _error:  # the transformer blocks and tables="torch" need no torchrec
    EmbeddingCollection = EmbeddingConfig = KeyedJaggedTensor = None  # type: ignore[assignment,misc]
    _TORCHREC_ERROR = _error

# feature -> table name (the same names in both table back-ends)
_TABLE_OF = {"item": "item_id", "category": "category_side", "time": "time_side", "user": "user_side"}


class SASRec(pl.LightningModule):
    """Next-item recommender: item (+ side feature) embeddings -> causal transformer -> item scores.

    Args:
        num_items: item vocabulary (ids 1..num_items; 0 is padding). ``None``: taken from the
            data module (``trainer.datamodule.num_items``) when the model is configured.
        max_len: positions the model reads (must match the data's ``max_len``).
        d_model, num_blocks, num_heads, mlp_ratio, dropout: transformer size.
        loss: ``"full"`` softmax over all items, or ``"sampled"`` softmax.
        num_negatives, negatives_per: negatives of the sampled loss, drawn once per step for the
            whole batch (``"batch"``) or for each position (``"position"``, gSASRec/eSASRec's).
        logq_correction: subtract log(expected count) from each sampled logit, so the sampled loss
            estimates the full softmax; ``False``: the plain sampled softmax of gSASRec/eSASRec.
        label_smoothing: the full softmax's target weight 1 - eps, eps spread over the items
            (padding excluded); separate and tied outputs, not the sampled loss nor a tp-split output.
        negative_sampling: ``"uniform"`` or ``"popularity"`` (training-set item frequencies,
            read from the data module when it offers ``item_counts()``).
        lr, weight_decay: Adam(W) for the network.
        table_optimizer, table_lr: optimizer of the item table (``adagrad`` runs fused inside
            backward on CPU and GPU; ``adam`` puts the table on the dense kernel with torch's Adam,
            or fbgemm's lazy Adam on CUDA with ``embedding_kernels={"item_id": "fused"}``).
        text_tower: fuse each item's id embedding with a small transformer encoding of its text
            tokens (token table also in a torchrec EmbeddingCollection); the data module must offer
            ``item_text_tokens`` (``SequenceDataModule(item_text=True)``).
        text_blocks: transformer blocks of the text tower.
        padding_lookups: also look up the padding positions (id 0) in the tables, as before 0.2;
            only for comparisons (`benchmarks/jagged.py`): the results are the same, the work is not.
        loss_normalization: how a step's target losses are averaged. ``"epoch_tokens"`` (default):
            their sum over (sequences in the batch x the mean targets per training sequence, which
            the data module reports as ``train_targets_per_sequence()``), so every target of an
            epoch weighs the same whichever batch it falls in, as with uniformly shuffled batches:
            length-grouped batches (`SequenceDataModule(batching="jagged")`) put short histories
            together, and a per-batch mean would weigh each of their few targets many times more
            than a target of a long history (measured on Amazon Beauty: validation HR@10 0.081
            instead of 0.091 after 9 epochs, docs/recommender.md); no collective per step. With a
            data module that does not report it, the step's global mean is used (``"global_tokens"``)
            and a warning says so. ``"global_tokens"``: the mean over every target of the global
            batch (one small all-reduce of the target count over dp per step), so data parallelism
            equals one process on that batch when ranks hold different numbers of targets;
            ``"per_rank"``: each rank's own mean (DDP's usual average of means). Not applied under a
            pipeline_spec() schedule (its microbatch losses are averaged).
        side_features: extra tables in the same sharded EmbeddingCollection, added to each
            position's item embedding: ``user`` (the user id), ``category`` (the item's first
            genre), ``time`` (the interaction's age bucket). Sizes come from the data module.
        eval_ks: cut-offs for HR@K / NDCG@K.
        exclude_seen: remove the user's history from the ranking in validation/test (off: the
            "full ranking" convention; both appear in published results).
        top_k: recommendations per user in ``predict``.
        tensor_parallel_output: what `tensor_parallel_plan` does with the output (scoring) layer
            under tensor parallelism: ``"replicated"`` (not split), ``"gathered"`` (weight split,
            logits all-gathered) or ``"vocab_parallel"`` (weight and logits split over the items;
            the full-softmax loss runs under torch's ``loss_parallel``; needs ``loss="full"``).
        sequence_parallel: shard the residual stream between the transformer blocks along the
            sequence under tensor parallelism (``max_len`` divisible by tp).
        output: ``"separate"`` (a ``Linear(d, num_items + 1)`` scores the items) or ``"tied"``
            (items are scored by their own embeddings, through the sharded item table:
            `lightning_hybrid.parallel.tied_output`; no rank holds every item's score).
        tables: ``"torchrec"`` (an `EmbeddingCollection` that HybridStrategy shards) or
            ``"torch"`` (plain ``nn.Embedding`` tables, replicated like any dense layer: for
            dense-only runs where torchrec/fbgemm are not installed; no text tower).
        block: the transformer block's layout (`lightning_hybrid.models.blocks`): ``"pre_norm"``
            (GELU MLP), ``"sasrec"`` (the SASRec paper's: raw keys/values, ReLU feed-forward) or ``"ligr"``
            (eSASRec's LiGR: gated residuals, SwiGLU; not with ``sequence_parallel``).
        init: ``"default"`` (torchrec's table init, positions N(0, 1), torch's layer init) or
            ``"xavier"`` (item-side tables, positions, the blocks' projections and a separate output
            Xavier-normal, as RecTools' SASRec that the published Amazon results use).
        scale_embeddings: multiply the looked-up embeddings by sqrt(d_model) before the positions
            are added (Transformer/SASRec paper); RecTools' SASRec does not.
    """

    def __init__(
        self,
        *,
        num_items: int | None = None,
        max_len: int = 50,
        d_model: int = 64,
        num_blocks: int = 2,
        num_heads: int = 1,
        mlp_ratio: int = 1,
        dropout: float = 0.2,
        loss: Literal["full", "sampled"] = "full",
        num_negatives: int = 256,
        negatives_per: Literal["batch", "position"] = "batch",
        negative_sampling: Literal["uniform", "popularity"] = "uniform",
        logq_correction: bool = True,
        label_smoothing: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        table_optimizer: Literal["adagrad", "adam"] = "adagrad",
        table_lr: float = 0.05,
        text_tower: bool = False,
        text_blocks: int = 1,
        padding_lookups: bool = False,
        loss_normalization: Literal["epoch_tokens", "global_tokens", "per_rank"] = "epoch_tokens",
        side_features: list[Literal["user", "category", "time"]] | None = None,
        eval_ks: list[int] | None = None,
        exclude_seen: bool = False,
        top_k: int = 10,
        tensor_parallel_output: Literal["replicated", "gathered", "vocab_parallel"] = "replicated",
        sequence_parallel: bool = False,
        output: Literal["separate", "tied"] = "separate",
        tables: Literal["torchrec", "torch"] = "torchrec",
        block: Literal["pre_norm", "sasrec", "ligr"] = "pre_norm",
        init: Literal["default", "xavier"] = "default",
        scale_embeddings: bool = True,
    ) -> None:
        super().__init__()
        if tables not in ("torchrec", "torch"):
            raise ValueError(f"SASRec(tables={tables!r}): use 'torchrec' or 'torch'.")
        if tables == "torchrec" and _TORCHREC_ERROR is not None:
            raise ImportError(
                f"SASRec(tables='torchrec') needs torchrec, which cannot be imported here ({_TORCHREC_ERROR}). Install "
                "torchrec and fbgemm-gpu (fbgemm-gpu-cpu on CPU), or use SASRec(tables='torch') for plain nn.Embedding tables."
            )
        if block not in LAYOUTS or init not in ("default", "xavier") or (block == "ligr" and sequence_parallel):
            raise ValueError(f"SASRec(block={block!r}, init={init!r}, sequence_parallel={sequence_parallel}): use block one of "
                             f"{LAYOUTS}, init 'default' or 'xavier'; LiGR's residual gates read whole sequences (sequence_parallel=False).")
        if tables == "torch" and text_tower:
            raise ValueError("SASRec(tables='torch', text_tower=True): the text tower needs torchrec tables; use tables='torchrec'.")
        if (num_items is not None and num_items < 1) or max_len < 1 or d_model < 1 or num_blocks < 1:
            raise ValueError(f"SASRec: num_items={num_items}, max_len={max_len}, d_model={d_model}, num_blocks={num_blocks} must be >= 1.")
        if loss not in ("full", "sampled") or negatives_per not in ("batch", "position"):
            raise ValueError(f"SASRec(loss={loss!r}, negatives_per={negatives_per!r}): use loss 'full' or 'sampled', negatives_per 'batch' or 'position'.")
        if loss_normalization not in ("epoch_tokens", "global_tokens", "per_rank"):
            raise ValueError(
                f"SASRec(loss_normalization={loss_normalization!r}): use 'epoch_tokens', 'global_tokens' or 'per_rank'."
            )
        if tensor_parallel_output not in ("replicated", "gathered", "vocab_parallel"):
            raise ValueError(
                f"SASRec(tensor_parallel_output={tensor_parallel_output!r}): use 'replicated', 'gathered' or 'vocab_parallel'."
            )
        if output not in ("separate", "tied") or (output == "tied" and tensor_parallel_output != "replicated"):
            raise ValueError(
                f"SASRec(output={output!r}, tensor_parallel_output={tensor_parallel_output!r}): use output 'separate' or "
                "'tied'; a tied output is scored through the sharded item table, not split by tensor parallelism."
            )
        if not 0.0 <= label_smoothing < 1.0 or (label_smoothing and (loss != "full" or tensor_parallel_output != "replicated")):
            raise ValueError(
                f"SASRec(label_smoothing={label_smoothing!r}, loss={loss!r}, tensor_parallel_output={tensor_parallel_output!r}): "
                "label smoothing is in [0, 1) and smooths the full softmax only (not the sampled loss, nor an output split by tensor parallelism)."
            )
        if tensor_parallel_output != "replicated" and loss != "full":
            raise ValueError(
                f"SASRec(tensor_parallel_output={tensor_parallel_output!r}) splits the output layer, which the sampled "
                f"loss reads row by row; use loss='full' or tensor_parallel_output='replicated'."
            )
        self.save_hyperparameters()
        self._targets_per_sequence = 0.0  # set at fit start from the data module (loss_normalization)
        self.max_len = max_len
        self.position = nn.Embedding(max_len, d_model)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(d_model, num_heads, d_model * mlp_ratio, dropout, layout=block) for _ in range(num_blocks)
        )
        if init == "xavier":
            for param in [*self.position.parameters(), *self.blocks.parameters()]:
                if param.dim() > 1:
                    nn.init.xavier_normal_(param)
        self.final_norm = nn.LayerNorm(d_model)
        self.val_metrics = RankingMetrics(eval_ks or [10, 20], prefix="val_")
        self.test_metrics = RankingMetrics(eval_ks or [10, 20], prefix="test_")
        self.num_items = 0
        self.side_features = list(side_features or [])
        unknown = sorted(set(self.side_features) - {"user", "category", "time"})
        if unknown:
            raise ValueError(f"SASRec(side_features=...): unknown {unknown}; use any of user, category, time.")
        if num_items is not None and not self.side_features:
            self._build_item_layers(num_items)

    def _build_item_layers(self, num_items: int, side_sizes: dict[str, int] | None = None) -> None:
        d_model = self.hparams.d_model
        self.num_items = num_items
        sizes = {"item": num_items + 1}
        for feature in ("category", "time", "user"):  # one EmbeddingCollection: one all-to-all for all of them
            if feature in self.side_features:
                sizes[feature] = (side_sizes or {})[feature]
        if self.hparams.get("tables", "torchrec") == "torch":
            self.item_tables: nn.Module = nn.ModuleDict({_TABLE_OF[f]: nn.Embedding(n, d_model) for f, n in sizes.items()})
            for table in self.item_tables.values():  # torchrec's default initialisation
                bound = (1.0 / table.num_embeddings) ** 0.5
                nn.init.uniform_(table.weight, -bound, bound)
        else:
            self.item_tables = EmbeddingCollection(
                tables=[EmbeddingConfig(name=_TABLE_OF[f], embedding_dim=d_model, num_embeddings=n, feature_names=[f]) for f, n in sizes.items()]
            )
        # Scores for every item (row 0, padding, is never a candidate): a separate dense layer, or
        # (output="tied") the item table itself, scored shard by shard where its rows live
        if self.hparams.get("output", "separate") == "separate":
            self.output = nn.Linear(d_model, num_items + 1, bias=False)
            nn.init.normal_(self.output.weight, std=d_model**-0.5)
        if self.hparams.get("init", "default") == "xavier":
            # the unsharded tables' values are what HybridStrategy shards (lightning_hybrid.parallel.embedding)
            tables = self.item_tables.values() if isinstance(self.item_tables, nn.ModuleDict) else self.item_tables.embeddings.values()
            for weight in [t.weight for t in tables] + ([self.output.weight] if hasattr(self, "output") else []):
                nn.init.xavier_normal_(weight)
        mask = torch.zeros(num_items + 1)
        mask[0] = float("-inf")
        self.register_buffer("padding_score_mask", mask, persistent=False)
        probs = torch.full((num_items + 1,), 1.0 / num_items)
        probs[0] = 0.0
        self.register_buffer("sampling_probs", probs, persistent=False)

    def _build_text_tower(self, tokens: torch.Tensor, vocab_size: int) -> None:
        d_model = self.hparams.d_model
        self.text_tables = EmbeddingCollection(
            tables=[EmbeddingConfig(name="text_token", embedding_dim=d_model, num_embeddings=vocab_size, feature_names=["token"])]
        )
        self.text_encoder = nn.ModuleList(
            CausalSelfAttentionBlock(
                d_model, self.hparams.num_heads, d_model * self.hparams.mlp_ratio, self.hparams.dropout, layout=self.hparams.get("block", "pre_norm")
            )
            for _ in range(self.hparams.text_blocks)
        )
        self.text_proj = nn.Linear(d_model, d_model)
        self.register_buffer("item_text_tokens", tokens.clone(), persistent=False)

    def configure_model(self) -> None:
        """Build the item layers from the data module's vocabulary when num_items was not given,
        and the text tower from the data module's item text."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self.hparams.text_tower and not hasattr(self, "text_tables"):
            tokens = getattr(datamodule, "item_text_tokens", None)
            if tokens is None:
                raise ValueError(
                    "SASRec(text_tower=True) needs item text from the data module: use SequenceDataModule(item_text=True) "
                    "(MovieLens movies.csv/movies.dat/u.item beside the ratings, or synthetic data)."
                )
            self._build_text_tower(tokens, int(datamodule.text_vocab_size))
        data_items = getattr(datamodule, "num_items", None)
        if self.num_items == 0:
            if data_items is None and self.hparams.num_items is None:
                raise ValueError(
                    "SASRec(num_items=None) needs a data module with a num_items property (e.g. SequenceDataModule), "
                    "or give num_items explicitly."
                )
            side_sizes = {}
            if self.side_features:
                if not hasattr(datamodule, "item_categories"):
                    raise ValueError("SASRec(side_features=...) needs a SequenceDataModule to size the side tables.")
                if "category" in self.side_features:
                    categories = datamodule.item_categories()
                    self.register_buffer("item_categories", categories, persistent=False)
                    side_sizes["category"] = int(categories.max()) + 1
                if "time" in self.side_features:
                    if datamodule.time_buckets() is None:
                        raise ValueError("SASRec(side_features=['time']): the data has no timestamps (e.g. SASRec line files); drop 'time'.")
                    side_sizes["time"] = datamodule.max_time_buckets + 1
                if "user" in self.side_features:
                    side_sizes["user"] = datamodule.num_users + 1
            self._build_item_layers(int(self.hparams.num_items or data_items), side_sizes)
        elif data_items is not None and data_items > self.num_items:
            raise ValueError(
                f"The data has {data_items} items but SASRec was built with num_items={self.num_items}. "
                f"Set model num_items >= {data_items} or leave it unset to follow the data."
            )

    # -- model ---------------------------------------------------------------------------------

    def encode(self, items: torch.Tensor, user: torch.Tensor | None = None, time: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] item ids (left padded with 0) -> [B, L, D] hidden states.

        ``user`` ([B], 0-based index, -1 for none) and ``time`` ([B, L] buckets) feed the side features.
        """
        x = self._block_input(self._embed(items, user, time), items)
        mask = causal_padding_mask(items)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)

    def _embed(self, items: torch.Tensor, user: torch.Tensor | None = None, time: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding lookups of a batch, summed per position: [B, L, D]."""
        if items.dim() != 2 or items.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"SASRec: the item sequences must be a [batch, length] integer tensor, got {items.dtype} of shape "
                f"{tuple(items.shape)}. Give item ids as torch.long (0 = padding)."
            )
        batch, length = items.shape
        if length > self.max_len:
            raise ValueError(f"SASRec: sequences of length {length} exceed max_len={self.max_len}; set data.max_len <= model max_len.")
        if items.numel() and (int(items.max()) > self.num_items or int(items.min()) < 0):
            raise ValueError(
                f"SASRec: item id {int(items.max()) if int(items.max()) > self.num_items else int(items.min())} is outside "
                f"0..{self.num_items} (num_items={self.num_items}). Set model num_items to the data's item count."
            )
        # only real positions are looked up (and sent through the tables' all-to-alls): padding
        # ids would be lookups of row 0, most of a step's lookups on short sequences, all served
        # by the rank that owns row 0; `padding_lookups=True` restores them (for comparisons)
        real = torch.ones_like(items, dtype=torch.bool) if self.hparams.padding_lookups else items != 0
        per_position = real.sum(1, dtype=torch.int32)
        keys, values, lengths = ["item"], [items[real]], [per_position]
        if "category" in self.side_features:
            keys.append("category")
            values.append(self.item_categories[items[real]])
            lengths.append(per_position)
        if "time" in self.side_features:
            if time is None:
                raise ValueError("SASRec(side_features=['time']) needs batch['time'] (time buckets) from the data module.")
            keys.append("time")
            values.append(time[real])
            lengths.append(per_position)
        if "user" in self.side_features:
            if user is None:
                raise ValueError("SASRec(side_features=['user']) needs batch['user'] from the data module.")
            keys.append("user")
            values.append((user + 1).clamp(min=0).reshape(-1))
            lengths.append(torch.ones(batch, dtype=torch.int32, device=items.device))
        if isinstance(self.item_tables, nn.ModuleDict):
            looked_up = {key: self.item_tables[_TABLE_OF[key]](ids) for key, ids in zip(keys, values, strict=True)}
        else:
            kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
            jagged = self.item_tables(kjt)
            looked_up = {key: jagged[key].values() for key in keys}
        emb = looked_up["item"].new_zeros(batch, length, looked_up["item"].shape[-1])
        emb = emb.index_put((real,), looked_up["item"])
        for feature in ("category", "time"):
            if feature in self.side_features:
                emb = emb.index_put((real,), looked_up[feature], accumulate=True)
        if "user" in self.side_features:
            emb = emb + looked_up["user"].view(batch, 1, -1)
        if self.hparams.text_tower:
            emb = emb + self._encode_text(items)
        return emb

    def _block_input(self, emb: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scaled embeddings + positions, padding zeroed: the input of the first block."""
        length = items.shape[1]
        positions = torch.arange(self.max_len - length, self.max_len, device=items.device)
        scale = math.sqrt(emb.shape[-1]) if self.hparams.get("scale_embeddings", True) else 1.0
        x = emb * scale + self.position(positions)
        return self.input_dropout(x) * (items != 0).unsqueeze(-1)

    def table_kernels(self) -> dict[str, str]:
        """A tied output reads the item table's weight, so the table must take gradients (HybridStrategy reads this)."""
        return {"item_id": "dense"} if self.hparams.get("output") == "tied" else {}

    def pipeline_spec(self) -> Any:
        """How HybridStrategy(pipeline_parallel > 1) runs this model (see lightning_hybrid.parallel.pipeline)."""
        if self.hparams.get("output") == "tied":
            raise ValueError(
                f"{type(self).__name__}(output='tied') cannot run with pipeline_parallel > 1 yet: the loss scores against "
                "the item table on every rank, the pipeline computes it on the last stage only. Use output='separate'."
            )
        if self.hparams.text_tower:
            raise ValueError(
                f"{type(self).__name__}(text_tower=True) cannot run with pipeline_parallel > 1 yet: the text tower's dense "
                "layers sit inside the embedding lookup, which every pipeline rank runs. Use text_tower=False or pipeline_parallel=1."
            )
        return PipelineSpec(
            blocks=self.blocks,
            lookup=lambda batch: self._embed(batch["input"], batch.get("user"), batch.get("time")),
            first=lambda mb, emb: self._block_input(emb, mb["input"]),
            block_forward=lambda block, x, mb: self._block(block, x, mb["input"]),
            last=lambda hidden, mb: self._loss(self.final_norm(hidden), mb["target"]),
            first_modules=("position",) if hasattr(self, "position") else (),
            last_modules=("final_norm", "output"),
            log_name="train_loss",
        )

    def _block(self, block: nn.Module, x: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """One block on hidden ``x`` of the sequences ``items`` (subclasses change the call)."""
        return block(x, causal_padding_mask(items))

    def tensor_parallel_plan(self) -> dict[str, str]:
        """Heads and MLP width of every transformer block split over the tp axis (HybridStrategy reads this)."""
        hp = self.hparams
        gated = hp.get("block") == "ligr"  # LiGR's SwiGLU gate splits like up
        plan = reference_plan("blocks", sequence_parallel=hp.sequence_parallel, num_blocks=hp.num_blocks, gated=gated)
        if hp.text_tower:
            plan.update(reference_plan("text_encoder", gated=gated))
        if hp.tensor_parallel_output != "replicated":
            plan["output"] = {"gathered": "colwise_gathered", "vocab_parallel": "vocab_parallel"}[hp.tensor_parallel_output]
        return plan

    def _encode_text(self, items: torch.Tensor) -> torch.Tensor:
        """[B, L] item ids -> [B, L, D] text vectors, each distinct item encoded once per batch."""
        unique, inverse = torch.unique(items, return_inverse=True)
        tokens = self.item_text_tokens[unique]  # [U, T]
        count, text_len = tokens.shape
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["token"], values=tokens.reshape(-1), lengths=torch.full((count,), text_len, dtype=torch.int32, device=items.device)
        )
        x = self.text_tables(kjt)["token"].values().view(count, text_len, -1)
        real = tokens != 0
        eye = torch.eye(text_len, dtype=torch.bool, device=items.device)
        mask = (real.unsqueeze(1) | eye).unsqueeze(1)  # every real token sees every real token
        for block in self.text_encoder:
            x = block(x, mask)
        pooled = (x * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
        return self.text_proj(pooled)[inverse]

    def forward(self, items: torch.Tensor, user: torch.Tensor | None = None, time: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item as the next one after each user's sequence: [B, num_items + 1]."""
        return self._scores(self.encode(items, user, time))

    def _scores(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.hparams.get("output") == "tied":
            rows = tied_output.table_rows(self.item_tables, "item_id")
            if rows.sharded:
                raise RuntimeError(
                    "SASRec(output='tied') on a sharded table has no rank with every item's score: rank with "
                    "lightning_hybrid.parallel.tied_output.sharded_target_ranks / sharded_top_k (validation, test and "
                    "predict do), or evaluate the checkpoint on one process."
                )
            scores = hidden[:, -1] @ rows.weight.t()
            scores[:, 0] = float("-inf")
            return scores
        scores = self.output(hidden[:, -1])
        if isinstance(scores, DTensor):  # vocab-parallel output: ranking needs every item's score
            scores = scores.full_tensor()
        scores[:, 0] = float("-inf")
        return scores

    # -- training ------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self._targets_per_sequence = 0.0
        if self.hparams.get("loss_normalization", "global_tokens") == "epoch_tokens":
            self._targets_per_sequence = epoch_targets_per_sequence(datamodule)
        if self.hparams.negative_sampling == "popularity" and hasattr(datamodule, "item_counts"):
            counts = datamodule.item_counts().to(self.sampling_probs)
            counts[0] = 0
            self.sampling_probs.copy_(counts / counts.sum())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens = int((batch["target"] != 0).sum())  # (one host sync: the check and the loss's weight)
        if tokens == 0:
            raise ValueError(
                f"SASRec: training batch {batch_idx} has no target positions (every sequence is empty or all "
                "padding), so its loss is undefined. Drop users with fewer than 2 interactions from the data."
            )
        hidden = self.encode(batch["input"], batch.get("user"), batch.get("time"))
        loss = self._loss(hidden, batch["target"])
        self.log("train_loss", loss, prog_bar=True, batch_size=tokens)
        normalization = self.hparams.loss_normalization
        if normalization == "epoch_tokens" and self._targets_per_sequence:
            # each rank's token sum over its share of the epoch's mean global batch: dp's average of
            # these is the global batch's sum over (global sequences x mean targets per sequence)
            return loss * tokens / (len(batch["target"]) * self._targets_per_sequence)
        if normalization in ("epoch_tokens", "global_tokens"):
            return loss * token_share(self, tokens)
        return loss

    def _loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Next-item loss of [B, L, D] final hidden states against [B, L] targets (0 = none)."""
        valid = target != 0
        h, positives = hidden[valid], target[valid]
        if self.hparams.get("output") == "tied":
            if self.hparams.loss == "full":
                rows = tied_output.table_rows(self.item_tables, "item_id")
                return tied_output.sharded_cross_entropy(h, positives, rows, self.hparams.get("label_smoothing", 0.0)).mean()
            return sampled_softmax_loss(
                h, positives, None, num_negatives=self.hparams.num_negatives, sampling_probs=self.sampling_probs, lookup=self._item_rows,
                logq_correction=self.hparams.get("logq_correction", True), per_position=self.hparams.get("negatives_per") == "position",
            )
        if self.hparams.loss == "full" and not isinstance(self.output.weight, DTensor):
            smoothing = self.hparams.get("label_smoothing", 0.0)  # (checkpoints from before it lack the key)
            loss = full_softmax_loss(h, positives, self.output.weight, self.output.bias, label_smoothing=smoothing)  # chunked when large
        elif self.hparams.loss == "full":
            logits = self.output(h)
            # item 0 (padding) is never a candidate: an added mask works on vocabulary-split
            # (DTensor) logits, an in-place write would not
            mask = self.padding_score_mask
            if isinstance(logits, DTensor):
                mask = DTensor.from_local(mask, logits.device_mesh, [Replicate()], run_check=False)
            loss = F.cross_entropy(logits + mask, positives)
        else:
            loss = sampled_softmax_loss(
                h, positives, self.output.weight, num_negatives=self.hparams.num_negatives, sampling_probs=self.sampling_probs,
                logq_correction=self.hparams.get("logq_correction", True), per_position=self.hparams.get("negatives_per") == "position",
            )
        return loss

    def _item_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The item table's rows for ``ids`` [N], through the (sharded) table: one id per sample."""
        if isinstance(self.item_tables, nn.ModuleDict):
            return self.item_tables["item_id"](ids)
        keys = ["item", *[f for f in ("category", "time", "user") if f in self.side_features]]
        lengths = torch.zeros(len(keys) * len(ids), dtype=torch.int32, device=ids.device)
        lengths[: len(ids)] = 1
        return self.item_tables(KeyedJaggedTensor.from_lengths_sync(keys=keys, values=ids, lengths=lengths))["item"].values()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        tables = list(self.item_tables.parameters())
        if self.hparams.text_tower:
            tables += list(self.text_tables.parameters())
        hp = self.hparams
        return network_and_table_optimizer(
            self.parameters(), tables, lr=hp.lr, weight_decay=hp.weight_decay, table_optimizer=hp.table_optimizer, table_lr=hp.table_lr
        )

    # -- evaluation ----------------------------------------------------------------------------

    def _ranked_scores(self, batch: dict[str, Any], exclude_seen: bool) -> torch.Tensor | None:
        runner = pipeline_runner(self)
        if runner is not None:  # pipeline: only the last stage's ranks see the final hidden states
            hidden = runner.forward(batch, batch["input"].shape[0])
            if hidden is None:
                return None
            scores = self._scores(self.final_norm(hidden))
        else:
            scores = self(batch["input"], batch.get("user"), batch.get("time"))
        if exclude_seen and batch["seen_values"].numel():
            rows = torch.repeat_interleave(torch.arange(len(scores), device=scores.device), batch["seen_lengths"])
            keep = scores.gather(1, batch["target"].view(-1, 1))
            scores[rows, batch["seen_values"]] = float("-inf")
            scores.scatter_(1, batch["target"].view(-1, 1), keep)  # the held-out item stays a candidate
        return scores

    def _target_ranks(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if self.hparams.get("output") == "tied":  # ranked shard by shard (parallel.tied_output)
            hidden = self.encode(batch["input"], batch.get("user"), batch.get("time"))[:, -1]
            rows = tied_output.table_rows(self.item_tables, "item_id")
            return tied_output.sharded_target_ranks(hidden, batch["target"], rows, self._seen(batch) if self.hparams.exclude_seen else None)
        scores = self._ranked_scores(batch, self.hparams.exclude_seen)
        return None if scores is None else target_ranks(scores, batch["target"])

    def _seen(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.repeat_interleave(torch.arange(len(batch["input"]), device=batch["input"].device), batch["seen_lengths"])
        return rows, batch["seen_values"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        ranks = self._target_ranks(batch)
        if ranks is None:
            return  # an earlier pipeline stage: the last stage counts these users
        self.val_metrics.update(ranks, batch["valid"])

    def on_validation_epoch_end(self) -> None:
        # values are already summed over ranks; sync_dist only keeps Lightning from warning
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        self.val_metrics.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        ranks = self._target_ranks(batch)
        if ranks is None:
            return
        self.test_metrics.update(ranks, batch["valid"])

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        valid = batch["valid"]
        if self.hparams.get("output") == "tied":  # each shard's top-k, merged (parallel.tied_output)
            hidden = self.encode(batch["input"], batch.get("user"), batch.get("time"))[:, -1]
            rows = tied_output.table_rows(self.item_tables, "item_id")
            values, items = tied_output.sharded_top_k(hidden, rows, self.hparams.top_k, self._seen(batch))
            return {"user": batch["user"][valid], "items": items[valid], "scores": values[valid]}
        scores = self._ranked_scores({**batch, "target": torch.zeros_like(batch["target"])}, exclude_seen=True)
        top = scores.topk(self.hparams.top_k, dim=1)
        return {"user": batch["user"][valid], "items": top.indices[valid], "scores": top.values[valid]}
