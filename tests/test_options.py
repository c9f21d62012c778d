"""Tier 1: HybridStrategy's option groups, the one validate(), and plan="auto" merging."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_hybrid import HybridStrategy
from lightning_hybrid.comm import GradientCompression
from lightning_hybrid.planner.cost import Layout
from lightning_hybrid.strategies import auto
from lightning_hybrid.strategies.options import HybridOptions, markdown_table, validate

ROOT = Path(__file__).resolve().parents[1]


def test_every_constructor_argument_is_an_option_field_with_the_same_default() -> None:
    params = {n: p.default for n, p in inspect.signature(HybridStrategy.__init__).parameters.items() if n != "self"}
    defaults = HybridOptions().flat()
    assert params == defaults
    for name in params:  # LightningCLI shows each one's help from the generated docstring
        assert f"    {name}: " in HybridStrategy.__doc__


def test_the_options_table_in_the_docs_is_the_code_s() -> None:
    text = (ROOT / "docs" / "getting-started.md").read_text()
    table = text.split("<!-- options-table:start -->\n")[1].split("<!-- options-table:end -->")[0]
    assert table == markdown_table()


def test_unknown_option_names_the_known_ones() -> None:
    with pytest.raises(TypeError, match="unknown options \\['pipeline_paralel'\\]"):
        HybridOptions.from_kwargs(pipeline_paralel=2)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"pipeline_parallel": 2, "dense_parallel": "fsdp"}, "pipeline_parallel > 1, dense_parallel='fsdp'"),
        ({"data_parallel_mode": "local_sgd", "pipeline_parallel": 2}, "data_parallel_mode='local_sgd') with pipeline_parallel"),
        ({"data_parallel_mode": "async", "gradient_compression": GradientCompression(method="topk")}, "async"),
        ({"data_parallel_mode": "async", "local_sgd_overlap": True}, "local_sgd_overlap=True, data_parallel_mode='async'"),
        ({"shard_embeddings": False, "embedding_sharding": {"t": "row_wise"}}, "shard_embeddings=False"),
    ],
)
def test_validate_refuses_with_the_combination_and_the_fix(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as error:
        validate(HybridOptions.from_kwargs(**kwargs))
    assert fragment in str(error.value)
    with pytest.raises(ValueError):
        HybridStrategy(**kwargs)  # the constructor runs the same function


def test_explicit_options_are_the_ones_that_differ_from_the_defaults() -> None:
    options = HybridOptions.from_kwargs(data_parallel_mode="async", pipeline_parallel=1)
    assert options.explicit() == {"data_parallel_mode"}


def test_a_planned_layout_is_validated_and_the_user_s_options_win() -> None:
    user = HybridOptions.from_kwargs(data_parallel_mode="async")
    # the planner would pick pipelining (refused with async) or compression (refused with async)
    merged, why = auto.merge(Layout(dp=1, pp=2, microbatches=2), user, "item_id")
    assert merged is None and "pipeline_parallel > 1" in why
    merged, why = auto.merge(Layout(dp=2, compression="powersgd"), user, "item_id")
    assert merged is None and "async" in why
    merged, _ = auto.merge(Layout(dp=2, table="row_wise"), user, "item_id")
    assert merged is not None
    assert merged.data.data_parallel_mode == "async" and merged.layout.data_parallel == 2
    assert merged.embedding.embedding_sharding == {"item_id": "row_wise"}
    # an explicit option that the layout contradicts: skipped, and the reason names it
    mine = HybridOptions.from_kwargs(gradient_compression=GradientCompression(method="fp16"))
    merged, why = auto.merge(Layout(dp=2, compression="powersgd"), mine, None)
    assert merged is None and "gradient_compression" in why


def test_a_planned_table_group_merges_and_the_user_s_group_size_restricts_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_hybrid.planner.cost import Estimate

    merged, _ = auto.merge(Layout(dp=4, table_group=2), HybridOptions.from_kwargs(plan="auto"), "item_id")
    assert merged is not None and merged.embedding.embedding_shard_group_size == 2
    assert merged.embedding.embedding_sharding == {"item_id": "row_wise"}
    # the options the strategy refuses with table groups exclude such a layout
    merged, why = auto.merge(Layout(dp=4, table_group=2), HybridOptions.from_kwargs(plan="auto", data_parallel_mode="local_sgd"), "item_id")
    assert merged is None and "data_parallel_mode='local_sgd'" in why

    def fake_search(cost, spec):  # noqa: ANN001, ANN202
        est = lambda layout, s: Estimate(layout=layout, parts={}, features={}, step_s=s, memory_bytes=0.0, fits=True)  # noqa: E731
        return [est(Layout(dp=8), 0.01), est(Layout(dp=8, table_group=2), 0.02), est(Layout(dp=8, table_group=4), 0.03)]

    import lightning_hybrid.planner as planner

    monkeypatch.setattr(planner, "search", fake_search)
    module = SimpleNamespace(planner_spec=lambda global_batch: None)
    choose = functools.partial(auto.choose_layout, module=module, datamodule=SimpleNamespace(batch_size=2), world_size=8, device_type="cpu")
    _, chosen = choose(HybridOptions.from_kwargs(plan="auto"), devices_per_node=4)
    assert chosen.layout == Layout(dp=8)  # nothing set: the fastest
    # "node" is the processes per node (4 here): only the layout with groups of 4 agrees
    options, chosen = choose(HybridOptions.from_kwargs(plan="auto", embedding_shard_group_size="node"), devices_per_node=4)
    assert chosen.layout == Layout(dp=8, table_group=4) and options.embedding.embedding_shard_group_size == 4
    _, chosen = choose(HybridOptions.from_kwargs(plan="auto", embedding_shard_group_size=2), devices_per_node=4)
    assert chosen.layout == Layout(dp=8, table_group=2)
    with pytest.raises(ValueError, match=r"embedding_shard_group_size=4 \(planned None\)"):
        choose(HybridOptions.from_kwargs(plan="auto", embedding_shard_group_size=4, data_parallel_mode="local_sgd"), devices_per_node=4)


def test_choose_layout_skips_layouts_the_options_forbid(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_hybrid.planner.cost import Estimate

    def fake_search(cost, spec):  # noqa: ANN001, ANN202
        est = lambda layout, s: Estimate(layout=layout, parts={}, features={}, step_s=s, memory_bytes=0.0, fits=True)  # noqa: E731
        return [est(Layout(dp=1, pp=2, microbatches=2), 0.01), est(Layout(dp=2, compression="topk"), 0.02), est(Layout(dp=2), 0.03)]

    import lightning_hybrid.planner as planner

    monkeypatch.setattr(planner, "search", fake_search)
    module = SimpleNamespace(planner_spec=lambda global_batch: None)
    data = SimpleNamespace(batch_size=8)
    options, chosen = auto.choose_layout(
        HybridOptions.from_kwargs(data_parallel_mode="async", plan="auto"), module=module, datamodule=data, world_size=2,
        devices_per_node=2, device_type="cpu",
    )
    assert chosen.layout == Layout(dp=2)  # the first two are refused with async
    assert options.data.gradient_compression is None and options.data.data_parallel_mode == "async"
    assert data.batch_size * chosen.layout.dp == 16  # the global batch (8 per replica on dp="auto" = 2) is kept


def test_a_planned_balanced_split_merges_and_pipelines_are_skipped_for_a_module_without_a_pipeline_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_hybrid.planner.cost import Estimate

    balanced = Layout(dp=1, pp=2, microbatches=2, split="balanced")
    merged, _ = auto.merge(balanced, HybridOptions.from_kwargs(plan="auto"), "item_id")
    assert merged is not None and merged.pipeline.pipeline_split == "balanced"
    # a split the user set wins: the planned one contradicts it and the layout is skipped
    merged, why = auto.merge(balanced, HybridOptions.from_kwargs(plan="auto", pipeline_split=[3, 1]), "item_id")
    assert merged is None and "pipeline_split=[3, 1] (planned 'balanced')" in why
    # without a pipeline the user's split stays as it is
    merged, _ = auto.merge(Layout(dp=2), HybridOptions.from_kwargs(plan="auto", pipeline_split="balanced"), "item_id")
    assert merged is not None and merged.pipeline.pipeline_split == "balanced"

    def fake_search(cost, spec):  # noqa: ANN001, ANN202
        est = lambda layout, s: Estimate(layout=layout, parts={}, features={}, step_s=s, memory_bytes=0.0, fits=True)  # noqa: E731
        return [est(balanced, 0.01), est(Layout(dp=1, pp=2, microbatches=2), 0.02), est(Layout(dp=2), 0.03)]

    import lightning_hybrid.planner as planner

    monkeypatch.setattr(planner, "search", fake_search)
    choose = functools.partial(auto.choose_layout, datamodule=SimpleNamespace(batch_size=8), world_size=2, devices_per_node=2, device_type="cpu")
    _, chosen = choose(HybridOptions.from_kwargs(plan="auto"), module=SimpleNamespace(planner_spec=lambda global_batch: None, pipeline_spec=None))
    assert chosen.layout == balanced
    # without a pipeline_spec the layers run through the layer pipeline, which refuses a schedule's
    # microbatches and the balanced split at setup: both pipelines are skipped, dp is taken
    options, chosen = choose(HybridOptions.from_kwargs(plan="auto"), module=SimpleNamespace(planner_spec=lambda global_batch: None))
    assert chosen.layout == Layout(dp=2) and options.layout.pipeline_parallel == 1
    with pytest.raises(ValueError, match=r"pipeline_split='balanced', pipeline_microbatches=2 need a pipeline_spec\(\) on SimpleNamespace"):
        choose(HybridOptions.from_kwargs(plan="auto", data_parallel=1), module=SimpleNamespace(planner_spec=lambda global_batch: None))
