"""Tier 1: the sequential recommender: shapes, causality, padding, sampled softmax."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.testing import assert_close

from lightning_hybrid.models.sasrec import SASRec, sampled_softmax_loss


def _model(**kwargs) -> SASRec:  # noqa: ANN003
    torch.manual_seed(0)
    model = SASRec(num_items=30, max_len=8, d_model=16, num_blocks=2, num_heads=2, dropout=0.0, **kwargs)
    return model.eval()


def test_shapes_and_backward() -> None:
    model = _model().train()
    items = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]])
    hidden = model.encode(items)
    assert hidden.shape == (2, 8, 16)
    scores = model(items)
    assert scores.shape == (2, 31) and torch.isinf(scores[:, 0]).all()
    loss = model.training_step({"input": items, "target": torch.roll(items, -1, 1)}, 0)
    loss.backward()
    assert model.output.weight.grad is not None and model.blocks[0].q.weight.grad is not None


def test_future_items_never_influence_earlier_positions() -> None:
    model = _model()
    a = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])
    b = a.clone()
    b[0, 5:] = torch.tensor([20, 21, 22])  # change only the future of position 4
    ha, hb = model.encode(a), model.encode(b)
    assert_close(ha[:, :5], hb[:, :5])
    assert not torch.allclose(ha[:, 5:], hb[:, 5:])


def test_padding_does_not_change_real_positions() -> None:
    model = _model()
    short = torch.tensor([[0, 0, 0, 0, 0, 4, 5, 6]])
    other_pad = short.clone()
    other_pad[0, :5] = 0
    assert_close(model.encode(short)[:, 5:], model.encode(other_pad)[:, 5:])
    assert torch.isfinite(model.encode(short)).all()


def test_out_of_range_item_is_an_error() -> None:
    model = _model()
    try:
        model(torch.tensor([[0, 0, 0, 0, 0, 0, 0, 31]]))
    except ValueError as err:
        assert "item id 31 is outside 0..30" in str(err)
    else:  # pragma: no cover
        raise AssertionError("no error")


def test_sampled_softmax_equals_full_softmax_when_every_item_is_sampled_once() -> None:
    torch.manual_seed(0)
    vocab, dim = 6, 4
    weight = torch.randn(vocab, dim)
    hidden = torch.randn(5, dim)
    positives = torch.tensor([1, 2, 3, 4, 5])
    full = F.cross_entropy(hidden @ weight.T, positives)
    # every item once, uniform q: expected count 1, correction log(1) = 0, the positive's copy removed
    sampled = sampled_softmax_loss(
        hidden, positives, weight, num_negatives=vocab, sampling_probs=torch.full((vocab,), 1.0 / vocab), negatives=torch.arange(vocab)
    )
    assert_close(sampled, full)


def test_sampled_softmax_without_logq_is_the_plain_sampled_cross_entropy() -> None:
    # hand-built: positive 2 against negatives [1, 3, 3] (raw logits, no correction); the positive's
    # own sampled copy would be removed, and with the correction every negative shifts by -log(3 q)
    weight = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    hidden = torch.tensor([[2.0, 1.0]])
    negatives = torch.tensor([1, 3, 3])
    probs = torch.full((4,), 0.25)
    logits = torch.tensor([1.0, 2.0, 3.0, 3.0])  # positive (item 2), then items 1, 3, 3
    plain = sampled_softmax_loss(hidden, torch.tensor([2]), weight, num_negatives=3, sampling_probs=probs, negatives=negatives, logq_correction=False)
    assert_close(plain, -torch.log_softmax(logits, 0)[0])
    corrected = sampled_softmax_loss(hidden, torch.tensor([2]), weight, num_negatives=3, sampling_probs=probs, negatives=negatives)
    shifted = torch.cat([logits[:1], logits[1:] - torch.log(torch.tensor(0.75))])
    assert_close(corrected, -torch.log_softmax(shifted, 0)[0])


@pytest.mark.parametrize("dim", [1, 8])  # d=1: more distinct items than K*d (the gather), d=8: the matmul
def test_per_position_negatives_are_each_position_s_own_sampled_cross_entropy(dim: int) -> None:
    torch.manual_seed(0)
    vocab, k = 12, 3
    weight = torch.randn(vocab, dim, requires_grad=True)
    hidden = torch.randn(4, dim, requires_grad=True)
    positives = torch.tensor([1, 5, 7, 7])
    negatives = torch.tensor([[2, 3, 3], [5, 9, 11], [0, 4, 8], [6, 10, 1]])  # row 1 holds its positive
    probs = torch.full((vocab,), 1.0 / vocab)
    for logq in (False, True):
        got = sampled_softmax_loss(hidden, positives, weight, num_negatives=k, sampling_probs=probs, negatives=negatives,
                                   logq_correction=logq, per_position=True)
        # reference: each position alone, with the batch-shared loss over its own sample
        want = torch.stack([
            sampled_softmax_loss(hidden[i : i + 1], positives[i : i + 1], weight, num_negatives=k, sampling_probs=probs,
                                 negatives=negatives[i], logq_correction=logq)
            for i in range(4)
        ]).mean()
        got_grads = torch.autograd.grad(got, [hidden, weight])
        want_grads = torch.autograd.grad(want, [hidden, weight])
        assert_close(got, want)
        for a, b in zip(got_grads, want_grads, strict=True):
            assert_close(a, b)
    # drawn: [N, K] from the sampling distribution (never item 0 when its probability is 0)
    probs[0] = 0.0
    gen = torch.Generator().manual_seed(0)
    loss = sampled_softmax_loss(hidden, positives, weight, num_negatives=64, sampling_probs=probs / probs.sum(), generator=gen, per_position=True)
    assert torch.isfinite(loss)


def test_sampled_softmax_with_logq_converges_to_full_softmax() -> None:
    torch.manual_seed(0)
    vocab, dim = 8, 4
    weight = torch.randn(vocab, dim) * 2  # spread-out logits, so a biased estimate shows
    hidden = torch.randn(16, dim)
    positives = torch.randint(0, vocab, (16,))
    full = F.cross_entropy(hidden @ weight.T, positives)
    skewed = torch.tensor([0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    gen = torch.Generator().manual_seed(1)
    corrected = sampled_softmax_loss(hidden, positives, weight, num_negatives=20000, sampling_probs=skewed, generator=gen)
    assert abs(corrected.item() - full.item()) < 0.02 * full.item()
    # without the correction (q treated as uniform) the estimate is biased by the skewed sample
    uniform_claim = torch.full((vocab,), 1.0 / vocab)
    neg = torch.multinomial(skewed, 20000, replacement=True, generator=gen)
    biased = sampled_softmax_loss(hidden, positives, weight, num_negatives=20000, sampling_probs=uniform_claim, negatives=neg)
    assert abs(biased.item() - full.item()) > 3 * abs(corrected.item() - full.item())


def test_text_tower_changes_item_representation_by_text() -> None:
    torch.manual_seed(0)
    model = SASRec(num_items=30, max_len=8, d_model=16, num_blocks=1, num_heads=2, dropout=0.0, text_tower=True)
    tokens = torch.zeros(31, 4, dtype=torch.long)
    tokens[1:, 0] = torch.arange(1, 31) % 5 + 2  # five "genres"
    model._build_text_tower(tokens, vocab_size=8)
    model.eval()
    items = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]])
    before = model.encode(items)
    model.item_text_tokens[4, 0] = 7  # change only the last item's text
    after = model.encode(items)
    assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7], after[:, 7])
    loss = model.training_step({"input": items, "target": torch.roll(items, -1, 1)}, 0)
    loss.backward()
    assert model.text_proj.weight.grad is not None


def test_block_without_mask_is_plain_causal_attention() -> None:
    from lightning_hybrid.models.sasrec import CausalSelfAttentionBlock, causal_padding_mask

    torch.manual_seed(0)
    block = CausalSelfAttentionBlock(16, 2, 32, dropout=0.0)
    x = torch.randn(2, 6, 16)
    no_padding = torch.ones(2, 6, dtype=torch.long)
    assert_close(block(x), block(x, causal_padding_mask(no_padding)))


def test_bad_sequences_are_clear_errors() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"sequences of length 9 exceed max_len=8"):
        model(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match=r"integer tensor, got torch.float32"):
        model(torch.ones(1, 8))
    empty = {"input": torch.zeros(2, 8, dtype=torch.long), "target": torch.zeros(2, 8, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"training batch 0 has no target positions"):
        model.training_step(empty, 0)


def test_plain_torch_tables_compute_what_the_torchrec_tables_compute() -> None:
    """SASRec(tables='torch') (nn.Embedding, for runs without torchrec) against the torchrec
    EmbeddingCollection with the same weights: same loss, same gradients, with a side feature."""
    models = {}
    for tables in ("torchrec", "torch"):
        torch.manual_seed(0)
        model = SASRec(max_len=8, d_model=16, num_blocks=2, num_heads=2, dropout=0.0, side_features=["user"], tables=tables)
        model._build_item_layers(30, {"user": 6})
        models[tables] = model
    reference, plain = models["torchrec"], models["torch"]
    state = {k.replace("item_tables.embeddings.", "item_tables."): v for k, v in reference.state_dict().items()}
    plain.load_state_dict(state)
    assert isinstance(plain.item_tables, torch.nn.ModuleDict) and set(plain.item_tables) == {"item_id", "user_side"}
    batch = {"input": torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]]), "user": torch.tensor([2, 4])}
    batch["target"] = torch.roll(batch["input"], -1, 1)
    losses = {name: m.training_step(dict(batch), 0) for name, m in models.items()}
    assert_close(losses["torch"], losses["torchrec"])
    for loss in losses.values():
        loss.backward()
    assert_close(plain.blocks[0].q.weight.grad, reference.blocks[0].q.weight.grad)
    assert_close(plain.item_tables["item_id"].weight.grad, reference.item_tables.embeddings["item_id"].weight.grad)


def test_bad_table_backend_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="tables='torch'"):
        SASRec(num_items=5, tables="torch", text_tower=True)
    with pytest.raises(ValueError, match="use 'torchrec' or 'torch'"):
        SASRec(num_items=5, tables="faiss")  # type: ignore[arg-type]


def test_chunked_full_softmax_equals_the_masked_cross_entropy() -> None:
    from lightning_hybrid.models.losses import full_softmax_loss

    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(37, 8, requires_grad=True), torch.randn(21, 8, requires_grad=True), torch.randn(21, requires_grad=True)
    targets = torch.randint(1, 21, (37,))
    mask = torch.zeros(21)
    mask[0] = float("-inf")
    reference = F.cross_entropy(hidden @ weight.T + bias + mask, targets)
    expected = torch.autograd.grad(reference, [hidden, weight, bias])
    for chunk_bytes in (10**9, 21 * 4 * 5):  # one piece; chunks of 5 rows (8 chunks, the last short)
        loss = full_softmax_loss(hidden, targets, weight, bias, chunk_bytes=chunk_bytes)
        assert_close(loss, reference)
        for got, want in zip(torch.autograd.grad(loss, [hidden, weight, bias]), expected, strict=True):
            assert_close(got, want)
    # label smoothing: eps spread over the 20 real items (padding excluded), written out here;
    # torch's own label_smoothing agrees once the padding column is dropped from the logits
    eps = 0.1
    logits = hidden @ weight.T + bias
    logp = torch.log_softmax(logits[:, 1:], dim=1)
    smoothed = ((1 - eps) * -logp.gather(1, (targets - 1).view(-1, 1)).squeeze(1) - eps * logp.mean(1)).mean()
    assert_close(smoothed, F.cross_entropy(logits[:, 1:], targets - 1, label_smoothing=eps))
    expected = torch.autograd.grad(smoothed, [hidden, weight, bias])
    for chunk_bytes in (10**9, 21 * 4 * 5):
        loss = full_softmax_loss(hidden, targets, weight, bias, chunk_bytes=chunk_bytes, label_smoothing=eps)
        assert_close(loss, smoothed)
        for got, want in zip(torch.autograd.grad(loss, [hidden, weight, bias]), expected, strict=True):
            assert_close(got, want)


def _multihead_attention_like(block: torch.nn.Module) -> torch.nn.MultiheadAttention:
    """torch's nn.MultiheadAttention (16 wide, 2 heads) holding ``block``'s q/k/v/out weights."""
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([block.q.weight, block.k.weight, block.v.weight]))
        mha.in_proj_bias.copy_(torch.cat([block.q.bias, block.k.bias, block.v.bias]))
        mha.out_proj.weight.copy_(block.out.weight)
        mha.out_proj.bias.copy_(block.out.bias)
    return mha


def test_sasrec_block_layout_is_the_papers_block_through_torch_multihead_attention() -> None:
    """layout='sasrec' against the SASRec authors' block written with torch's own
    nn.MultiheadAttention (as RecTools' SASRecTransformerLayer): LayerNorm'd queries, raw
    keys/values, residual onto the normalised queries, ReLU feed-forward added to its input."""
    from lightning_hybrid.models.blocks import CausalSelfAttentionBlock

    torch.manual_seed(0)
    block = CausalSelfAttentionBlock(16, 2, 16, dropout=0.0, layout="sasrec")
    mha = _multihead_attention_like(block)
    x = torch.randn(3, 7, 16)
    q = block.attn_norm(x)
    future = torch.ones(7, 7, dtype=torch.bool).triu(1)
    h = block.mlp_norm(q + mha(q, x, x, attn_mask=future, need_weights=False)[0])
    expected = h + block.down(torch.relu(block.up(h)))
    assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(CausalSelfAttentionBlock(16, 2, 16, dropout=0.0)(x), expected)  # the layouts differ
    with pytest.raises(ValueError, match="layout='post_norm'"):
        CausalSelfAttentionBlock(16, 2, 16, dropout=0.0, layout="post_norm")  # type: ignore[arg-type]


def test_ligr_block_layout_is_the_ligr_layer_through_torch_multihead_attention() -> None:
    """layout='ligr' against LiGR (arXiv 2502.03417) as eSASRec runs it, written with torch's
    nn.MultiheadAttention: pre-norm sub-layers added through sigmoid gates of the raw stream, a
    SwiGLU feed-forward without biases; SASRec(block='ligr') refuses sequence parallelism."""
    from lightning_hybrid.models.blocks import CausalSelfAttentionBlock

    torch.manual_seed(0)
    block = CausalSelfAttentionBlock(16, 2, 32, dropout=0.0, layout="ligr")
    assert block.up.bias is None and block.down.bias is None and block.gate.weight.shape == (32, 16)
    with torch.no_grad():  # non-trivial norms and gates, so a swapped or missing term shows
        for module in (block.attn_norm, block.mlp_norm, block.attn_gate, block.mlp_gate):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.5)
    mha = _multihead_attention_like(block)
    x = torch.randn(3, 7, 16)
    future = torch.ones(7, 7, dtype=torch.bool).triu(1)
    h = block.attn_norm(x)
    x1 = x + torch.sigmoid(x @ block.attn_gate.weight.T + block.attn_gate.bias) * mha(h, h, h, attn_mask=future, need_weights=False)[0]
    h1 = block.mlp_norm(x1)
    ffn = (F.silu(h1 @ block.gate.weight.T) * (h1 @ block.up.weight.T)) @ block.down.weight.T
    expected = x1 + torch.sigmoid(x1 @ block.mlp_gate.weight.T + block.mlp_gate.bias) * ffn
    assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sequence_parallel=True"):
        SASRec(num_items=10, block="ligr", sequence_parallel=True, tables="torch")


@pytest.mark.parametrize("tables", ["torchrec", "torch"])
def test_xavier_init_and_unscaled_embeddings(tables: str) -> None:
    """init='xavier' draws every matrix (item table, positions, projections) with Xavier-normal's
    std sqrt(2 / (fan_in + fan_out)); scale_embeddings=False adds positions to the raw rows."""
    torch.manual_seed(0)
    model = SASRec(num_items=3000, max_len=50, d_model=64, num_blocks=1, dropout=0.0, init="xavier", scale_embeddings=False, tables=tables)
    table = model.item_tables["item_id"] if tables == "torch" else model.item_tables.embeddings["item_id"]
    for weight, (fan_out, fan_in) in ((table.weight, (3001, 64)), (model.position.weight, (50, 64)), (model.blocks[0].up.weight, (64, 64))):
        assert abs(float(weight.detach().std()) / (2 / (fan_in + fan_out)) ** 0.5 - 1) < 0.05
    default = SASRec(num_items=3000, max_len=50, d_model=64, tables=tables)
    assert abs(float(default.position.weight.detach().std()) - 1.0) < 0.05  # N(0, 1): the 'default' init is unchanged
    items = torch.tensor([[0, 5, 6]])
    emb = torch.randn(1, 3, 64)
    expected = (emb + model.position(torch.arange(47, 50))) * torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1)
    assert_close(model._block_input(emb, items), expected)
    with pytest.raises(ValueError, match="init='he'"):
        SASRec(num_items=10, init="he")  # type: ignore[arg-type]
