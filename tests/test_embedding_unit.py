"""Tier 1: table discovery, constraints, id checks and optimizer translation (single process)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_hybrid.parallel import embedding as emb
from lightning_hybrid.parallel import embedding_optim as emb_optim
from tests.helpers import TinyClicks, TinyRec, collate

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torchrec.optim as trec_optim
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def _weights(model: TinyRec) -> dict[str, torch.nn.Parameter]:
    infos = emb.table_infos(emb.find_embedding_modules(model))
    return {i.table_name: model.get_parameter(i.weight_fqn) for i in infos}


def test_finds_tables_anywhere() -> None:
    model = torch.nn.Module()
    model.inner = torch.nn.Sequential(TinyRec(kind="ec"))
    found = emb.find_embedding_modules(model)
    assert list(found) == ["inner.0.tables"]
    infos = emb.table_infos(found)
    assert [(i.table_name, i.num_embeddings, i.pooled) for i in infos] == [
        ("t_user", 24, False),
        ("t_item", 40, False),
        ("t_category", 16, False),
    ]
    assert infos[0].weight_fqn == "inner.0.tables.embeddings.t_user.weight"


def test_constraints_force_types_and_kernels() -> None:
    infos = emb.table_infos(emb.find_embedding_modules(TinyRec()))
    spec = emb.EmbeddingShardingSpec(sharding_types={"t_user": "row_wise", "t_item": "data_parallel"})
    kernels = {"t_user": "fused", "t_item": "fused", "t_category": "dense"}
    cons = emb.build_constraints(infos, spec, kernels)
    assert cons["t_user"].sharding_types == ["row_wise"] and cons["t_user"].compute_kernels == ["fused"]
    assert cons["t_item"].compute_kernels == ["dense"]  # data_parallel tables are always dense
    assert cons["t_category"].compute_kernels == ["dense"]


def test_data_parallel_is_refused_for_embedding_collection() -> None:
    infos = emb.table_infos(emb.find_embedding_modules(TinyRec(kind="ec")))
    spec = emb.EmbeddingShardingSpec(sharding_types={"t_user": "data_parallel"})
    with pytest.raises(ValueError, match="EmbeddingCollection, which torchrec 1.8 cannot shard data_parallel"):
        emb.build_constraints(infos, spec, {i.table_name: "fused" for i in infos})


def test_id_check_names_feature_id_and_table() -> None:
    limits = {"user": (24, "t_user"), "item": (40, "t_item")}
    ok = KeyedJaggedTensor.from_lengths_sync(["user", "item"], torch.tensor([0, 23, 39]), torch.tensor([2, 1]))
    emb.check_ids(ok, limits)
    high = KeyedJaggedTensor.from_lengths_sync(["user", "item"], torch.tensor([0, 23, 40]), torch.tensor([2, 1]))
    with pytest.raises(ValueError, match=r"Feature 'item' has id 40, outside table 't_item' of 40 rows"):
        emb.check_ids(high, limits)
    negative = KeyedJaggedTensor.from_lengths_sync(["user", "item"], torch.tensor([-3, 1, 2]), torch.tensor([2, 1]))
    with pytest.raises(ValueError, match=r"Feature 'user' has id -3"):
        emb.check_ids(negative, limits)
    unknown = KeyedJaggedTensor.from_lengths_sync(["genre"], torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"features \['genre'\] that no embedding table reads"):
        emb.check_ids(unknown, limits)
    floats = KeyedJaggedTensor(["user", "item"], torch.tensor([0.0, 1.0, 2.0]), lengths=torch.tensor([2, 1]))
    with pytest.raises(TypeError, match=r"Feature ids must be int32 or int64, got torch.float32"):
        emb.check_ids(floats, limits)
    short = KeyedJaggedTensor(["user", "item"], torch.tensor([0, 1, 2]), lengths=torch.tensor([2, 2]))
    with pytest.raises(ValueError, match=r"lengths add up to 4 ids but it holds 3 values"):
        emb.check_ids(short, limits)
    negative_length = KeyedJaggedTensor(["user", "item"], torch.tensor([0, 1, 2]), lengths=torch.tensor([4, -1]))
    with pytest.raises(ValueError, match=r"has a negative length \(-1\)"):
        emb.check_ids(negative_length, limits)


def test_id_check_reads_the_device_once_and_finds_the_bad_id_of_each_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountScalarReads(TorchDispatchMode):  # .item()/int(t): one host sync each on CUDA
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func is torch.ops.aten._local_scalar_dense.default:
                CountScalarReads.reads += 1
            return func(*args, **(kwargs or {}))

    copies = []
    real = emb._to_host
    monkeypatch.setattr(emb, "_to_host", lambda t: copies.append(t) or real(t))
    limits = {"a": (10, "t_a"), "b": (5, "t_b"), "c": (7, "t_c")}
    # batch of 3 per key, key "b" empty, key "c" holds the only bad id (7) in its last sample
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b", "c"], torch.tensor([9, 0, 3, 1, 6, 2, 7]), torch.tensor([2, 0, 1, 0, 0, 0, 1, 1, 2])
    )
    with CountScalarReads(), pytest.raises(ValueError, match=r"Feature 'c' has id 7, outside table 't_c' of 7 rows"):
        emb.check_ids(kjt, limits)
    assert len(copies) == 1 and CountScalarReads.reads == 0
    fine = KeyedJaggedTensor.from_lengths_sync(["a", "b", "c"], torch.tensor([9, 0, 3, 1, 6, 2, 6]), torch.tensor([2, 0, 1, 0, 0, 0, 1, 1, 2]))
    emb.check_ids(fine, limits)
    # variable batch size per key (torchrec's stride_per_key_per_rank)
    variable = KeyedJaggedTensor(["a", "c"], torch.tensor([1, 2, 8]), lengths=torch.tensor([1, 1, 1]), stride_per_key_per_rank=[[2], [1]])
    with pytest.raises(ValueError, match=r"Feature 'c' has id 8"):
        emb.check_ids(variable, limits)


def test_optimizer_translation() -> None:
    model = TinyRec()
    weights = _weights(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.3)
    choice = emb_optim.choose_table_optimizers(
        optimizers=[sgd], table_weights=weights, device_type="cpu", accumulate_grad_batches=1, forced_kernels={}
    )
    assert set(choice.kernels.values()) == {"fused"}
    assert choice.fused["t_user"].optimizer_class is trec_optim.SGD
    assert choice.fused["t_user"].kwargs == {"lr": 0.3}

    adagrad = torch.optim.Adagrad(model.parameters(), lr=0.2, eps=1e-8)
    choice = emb_optim.choose_table_optimizers(
        optimizers=[adagrad], table_weights=weights, device_type="cpu", accumulate_grad_batches=1, forced_kernels={}
    )
    assert choice.fused["t_item"].optimizer_class is trec_optim.Adagrad
    assert choice.fused["t_item"].kwargs == {"lr": 0.2, "eps": 1e-8}


@pytest.mark.parametrize(
    ("make", "device", "accumulate", "reason"),
    [
        (lambda p: torch.optim.Adam(p, lr=1e-3), "cpu", 1, "fbgemm has no fused Adam on cpu"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "cpu", 1, "no momentum"),
        (lambda p: torch.optim.RMSprop(p, lr=0.1), "cpu", 1, "RMSprop has no fused fbgemm equivalent"),
        (lambda p: torch.optim.SGD(p, lr=0.1), "cpu", 4, "accumulate_grad_batches=4"),
    ],
)
def test_dense_fallback_with_reason(make, device: str, accumulate: int, reason: str) -> None:  # noqa: ANN001
    model = TinyRec()
    choice = emb_optim.choose_table_optimizers(
        optimizers=[make(model.parameters())],
        table_weights=_weights(model),
        device_type=device,
        accumulate_grad_batches=accumulate,
        forced_kernels={},
    )
    assert set(choice.kernels.values()) == {"dense"}
    assert reason in choice.dense_reasons["t_user"]


def test_adam_on_cuda_keeps_torch_s_rule_unless_the_lazy_fused_adam_is_chosen() -> None:
    """fbgemm's fused Adam is lazy (only looked-up rows move): never chosen silently."""
    model = TinyRec()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.95), eps=1e-7)
    choice = emb_optim.choose_table_optimizers(
        optimizers=[adam], table_weights=_weights(model), device_type="cuda", accumulate_grad_batches=1, forced_kernels={}
    )
    assert choice.kernels["t_user"] == "dense" and "lazy Adam" in choice.dense_reasons["t_user"]
    forced = {t: "fused" for t in _weights(model)}
    choice = emb_optim.choose_table_optimizers(
        optimizers=[adam], table_weights=_weights(model), device_type="cuda", accumulate_grad_batches=1, forced_kernels=forced
    )
    assert choice.fused["t_user"].optimizer_class is trec_optim.Adam
    assert choice.fused["t_user"].kwargs == {"lr": 1e-3, "beta1": 0.8, "beta2": 0.95, "eps": 1e-7}


def test_lazy_adam_refuses_torch_adam_weight_decay_and_decouples_adamw_s() -> None:
    model = TinyRec()
    forced = {t: "fused" for t in _weights(model)}
    with pytest.raises(ValueError, match="adds an L2 term to the gradient"):
        emb_optim.choose_table_optimizers(
            optimizers=[torch.optim.Adam(model.parameters(), weight_decay=0.1)], table_weights=_weights(model),
            device_type="cuda", accumulate_grad_batches=1, forced_kernels=forced,
        )
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

    choice = emb_optim.choose_table_optimizers(
        optimizers=[torch.optim.AdamW(model.parameters(), weight_decay=0.1)], table_weights=_weights(model),
        device_type="cuda", accumulate_grad_batches=1, forced_kernels=forced,
    )
    assert choice.fused["t_user"].kwargs["weight_decay_mode"] == WeightDecayMode.DECOUPLE


def test_forcing_fused_for_an_impossible_optimizer_is_an_error() -> None:
    model = TinyRec()
    with pytest.raises(ValueError, match=r"embedding_kernels=\{'t_user': 'fused'\}\) is impossible"):
        emb_optim.choose_table_optimizers(
            optimizers=[torch.optim.Adam(model.parameters())],
            table_weights=_weights(model),
            device_type="cpu",
            accumulate_grad_batches=1,
            forced_kernels={"t_user": "fused"},
        )


def test_table_missing_from_optimizers_is_an_error() -> None:
    model = TinyRec()
    only_mlp = torch.optim.SGD(model.mlp.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Embedding table 't_user' is in no optimizer"):
        emb_optim.choose_table_optimizers(
            optimizers=[only_mlp], table_weights=_weights(model), device_type="cpu", accumulate_grad_batches=1, forced_kernels={}
        )


def test_collate_builds_kjt() -> None:
    batch = collate([TinyClicks(4)[i] for i in range(4)])
    assert batch["sparse"].keys() == ["user", "item", "category"]
    assert batch["dense"].shape == (4, 5)


def test_reordered_keyed_tensor_matches_a_rebuilt_one() -> None:
    from torchrec.sparse.jagged_tensor import KeyedTensor

    parts = {"a": torch.randn(3, 2, requires_grad=True), "b": torch.randn(3, 4), "c": torch.randn(3, 1)}
    sharded_order = KeyedTensor.from_tensor_list(["c", "a", "b"], [parts["c"], parts["a"], parts["b"]])
    view = emb.ReorderedKeyedTensor(sharded_order, ["a", "b", "c"])
    expected = KeyedTensor.from_tensor_list(["a", "b", "c"], [parts["a"], parts["b"], parts["c"]])
    assert view.keys() == ["a", "b", "c"]
    assert view.length_per_key() == [2, 4, 1]
    assert view.offset_per_key() == expected.offset_per_key()
    assert torch.equal(view.values(), expected.values())
    assert torch.equal(view["b"], parts["b"])
    assert list(view.to_dict()) == ["a", "b", "c"]
    view.values().sum().backward()  # gradients flow through the lazy concatenation
    assert torch.equal(parts["a"].grad, torch.ones(3, 2))


def test_grouped_optimizer_tables_follow_their_sub_optimizer() -> None:
    from lightning_hybrid.optim import GroupedOptimizer

    model = TinyRec()
    grouped = GroupedOptimizer(
        [torch.optim.Adam(model.mlp.parameters(), lr=1e-3), torch.optim.Adagrad(model.tables.parameters(), lr=0.07)]
    )
    choice = emb_optim.choose_table_optimizers(
        optimizers=[grouped], table_weights=_weights(model), device_type="cpu", accumulate_grad_batches=1, forced_kernels={}
    )
    assert set(choice.kernels.values()) == {"fused"}
    assert choice.fused["t_item"].optimizer_class is trec_optim.Adagrad
    assert choice.fused["t_item"].kwargs["lr"] == 0.07
    assert choice.fused["t_item"].source == (0, 1)  # group 1 of the grouped optimizer: the Adagrad group


def test_sequence_tables_fall_back_to_the_dense_kernel_like_pooled_ones() -> None:
    model = TinyRec(kind="ec")
    infos = emb.table_infos(emb.find_embedding_modules(model))
    weights = {i.table_name: model.get_parameter(i.weight_fqn) for i in infos}
    choice = emb_optim.choose_table_optimizers(
        optimizers=[torch.optim.Adam(model.parameters())], table_weights=weights, device_type="cpu",
        accumulate_grad_batches=1, forced_kernels={},
    )
    assert set(choice.kernels.values()) == {"dense"} and "no fused Adam on cpu" in choice.dense_reasons["t_user"]
    choice = emb_optim.choose_table_optimizers(
        optimizers=[torch.optim.SGD(model.parameters(), lr=0.1)], table_weights=weights, device_type="cpu",
        accumulate_grad_batches=2, forced_kernels={},
    )
    assert set(choice.kernels.values()) == {"dense"} and "accumulate_grad_batches=2" in choice.dense_reasons["t_user"]


def test_pipeline_gradient_hand_over_keeps_dense_table_slices_apart() -> None:
    """torchrec's dense-kernel table parameters are TableBatchedEmbeddingSlice views whose grad
    setter copies into the live gradient: restoring the earlier gradient must not overwrite the
    stashed one (it did: from the second step on, pipelined dense tables trained on stale grads)."""
    from torchrec.distributed.composable.table_batched_embedding_slice import TableBatchedEmbeddingSlice

    from lightning_hybrid.strategies.steps import add_stashed, set_aside_gradients, stash_gradients

    flat = torch.zeros(12, requires_grad=True)
    table = TableBatchedEmbeddingSlice(flat.data, 0, 12, 3, 4)
    table._original_tensor = flat
    flat.grad = torch.full((12,), 1.0)  # the previous step's gradient, still there
    before = set_aside_gradients([table])
    flat.grad = torch.full((12,), 2.0)  # this step's, computed inside training_step
    stash = stash_gradients([table], before, keep=True)
    assert torch.equal(table.grad, torch.full((3, 4), 1.0))  # the earlier one is back in place
    table.grad = None  # Lightning's zero_grad
    add_stashed(stash)
    assert torch.equal(table.grad, torch.full((3, 4), 2.0))  # this step's, not the earlier one
