"""Bad recipes: every problem reported at once, each with its field path and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from uniperceiver_cli.recipe.errors import RecipeError
from uniperceiver_cli.recipe.load import load_recipe

GOOD = """\
command: pretrain
run:
  name: demo
  seed: 1
model:
  preset: tiny
  moe:
    routing: attribute
    num_experts: 4
    top_k: 2
tasks:
  - name: cls
    type: image_classification
    batch_size: 8
    data: {format: toy, num_samples: 64}
  - name: cap
    type: image_caption
    batch_size: 4
    data: {format: toy}
optim:
  lr: 1.0e-3
  betas: [0.9, 0.95]
schedule:
  max_steps: 10
  warmup_steps: 2
runtime:
  device: cpu
"""


def _with(line_no: int, new: str) -> str:
    """Replace 1-based line `line_no` of GOOD by `new`."""
    lines = GOOD.splitlines()
    lines[line_no - 1] = new
    return "\n".join(lines) + "\n"


# (id, recipe text, overrides, expected [(field, line or --set source)])
CASES: list[tuple[str, str, list[str], list[tuple[str, int | str]]]] = [
    ("typo_top_level", GOOD + "schedul: {max_steps: 3}\n", [], [("schedul", 28)]),
    ("typo_in_run", _with(4, "  sead: 1"), [], [("run.sead", 4)]),
    ("typo_in_moe", _with(10, "    topk: 2"), [], [("model.moe.topk", 10)]),
    (
        "typo_in_task",
        _with(14, "    batchsize: 8"),
        [],
        [("tasks[0].batchsize", 14), ("tasks[0].batch_size", 12)],
    ),
    (
        "typo_in_data",
        _with(15, "    data: {format: toy, num_sample: 64}"),
        [],
        [("tasks[0].data.num_sample", 15)],
    ),
    ("zero_batch", _with(14, "    batch_size: 0"), [], [("tasks[0].batch_size", 14)]),
    ("negative_lr", _with(21, "  lr: -1.0"), [], [("optim.lr", 21)]),
    ("beta_too_big", _with(22, "  betas: [0.9, 1.5]"), [], [("optim.betas[1]", 22)]),
    ("bad_device", _with(27, "  device: tpu"), [], [("runtime.device", 27)]),
    ("bad_preset", _with(6, "  preset: huge"), [], [("model.preset", 6)]),
    ("bad_routing", _with(8, "    routing: random"), [], [("model.moe.routing", 8)]),
    ("top_k_gt_experts", _with(10, "    top_k: 8"), [], [("model.moe.top_k", 10)]),
    ("experts_zero", _with(9, "    num_experts: 0"), [], [("model.moe.num_experts", 9)]),
    ("unknown_task_type", _with(13, "    type: image_captionn"), [], [("tasks[0].type", 13)]),
    (
        "unknown_format",
        _with(15, "    data: {format: parquet}"),
        [],
        [("tasks[0].data.format", 15)],
    ),
    (
        "format_wrong_for_type",
        _with(19, "    data: {format: text_corpus, file: a.txt}"),
        [],
        [("tasks[1].data.format", 19)],
    ),
    ("warmup_ge_steps", _with(25, "  warmup_steps: 10"), [], [("schedule.warmup_steps", 25)]),
    (
        "missing_schedule",
        GOOD.replace("schedule:\n  max_steps: 10\n  warmup_steps: 2\n", ""),
        [],
        [("schedule", 1)],
    ),
    (
        "missing_task_name",
        _with(12, "  - title: cls"),
        [],
        [("tasks[0].title", 12), ("tasks[0].name", 12)],
    ),
    ("duplicate_task_names", _with(16, "  - name: cls"), [], [("tasks", 11)]),
    ("duplicate_key", _with(5, "model:\n  preset: tiny\nmodel:"), [], [("model", 7)]),
    ("bad_name_pattern", _with(3, "  name: 'my run!'"), [], [("run.name", 3)]),
    (
        "bad_override_value",
        GOOD,
        ["schedule.max_steps=abc"],
        [("schedule.max_steps", "--set schedule.max_steps=abc")],
    ),
    ("override_typo", GOOD, ["run.sed=3"], [("run.sed", "--set run.sed=3")]),
    (
        "override_bad_index",
        GOOD,
        ["tasks.7.batch_size=3"],
        [("tasks[7]", "--set tasks.7.batch_size=3")],
    ),
    ("override_no_equals", GOOD, ["schedule.max_steps"], [("", "--set schedule.max_steps")]),
    ("wrong_command", _with(1, "command: eval"), [], [("command", 1)]),
    (
        "smoothing_out_of_range",
        _with(14, "    batch_size: 8\n    label_smoothing: 1.5"),
        [],
        [("tasks[0].label_smoothing", 15)],
    ),
    (
        "layers_bad_literal",
        _with(10, "    top_k: 2\n    layers: odd"),
        [],
        [("model.moe.layers", 11)],
    ),
    (
        "moe_layer_out_of_range",
        _with(10, "    top_k: 2\n    layers: [0, 5]"),
        [],
        [("model.moe.layers", 11)],
    ),
    (
        "expert_parallel_not_divisor",
        _with(10, "    top_k: 2\n    expert_parallel_size: 3"),
        [],
        [("model.moe.expert_parallel_size", 11)],
    ),
    (
        "expert_ffn_needs_token_routing",
        _with(10, "    top_k: 2\n    expert_ffn: true"),
        [],
        [("model.moe.expert_ffn", 11)],
    ),
    ("syntax_error", _with(6, "  preset: [tiny"), [], [("", 7)]),
]


@pytest.mark.parametrize(
    ("text", "overrides", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_recipe_reports_field_and_line(
    tmp_path: Path, text: str, overrides: list[str], expected: list[tuple[str, int | str]]
) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides, expected_command="pretrain")
    found = {(i.field, i.source if i.source else i.line) for i in info.value.issues}
    for field, where in expected:
        assert (field, where) in found, (
            f"expected {field!r} at {where!r}; got {sorted(found, key=str)}"
        )
    for issue in info.value.issues:
        assert issue.message, issue


def test_three_problems_in_one_table(tmp_path: Path) -> None:
    """A typo, an out-of-range number and top_k > num_experts are reported together."""
    text = _with(4, "  sead: 1")
    text = text.replace("    top_k: 2", "    top_k: 8").replace(
        "    batch_size: 8", "    batch_size: -3"
    )
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, expected_command="pretrain")
    by_field = {i.field: i for i in info.value.issues}
    assert by_field["run.sead"].line == 4
    assert "did you mean 'seed'" in by_field["run.sead"].message
    assert by_field["tasks[0].batch_size"].line == 14
    assert by_field["tasks[0].batch_size"].got == "-3"
    assert by_field["model.moe.top_k"].line == 10
    assert "top_k (8) must be <= num_experts (4)" in by_field["model.moe.top_k"].message


def test_good_recipe_loads(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    loaded = load_recipe(
        path, ["schedule.max_steps=20", "tasks.0.batch_size=16"], expected_command="pretrain"
    )
    assert loaded.recipe.schedule.max_steps == 20
    assert loaded.recipe.tasks[0].batch_size == 16
    assert loaded.recipe.model.moe.top_k == 2


def test_missing_command_is_taken_from_the_invocation(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(GOOD.replace("command: pretrain\n", ""))
    assert load_recipe(path, expected_command="pretrain").command == "pretrain"
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.issues[0].field == "command"


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="folder"):
        load_recipe(tmp_path)


def test_non_mapping_recipe(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent("- a\n- b\n"))
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(path)


def test_yaml_float_trap_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(_with(21, "  lr: 1e-3"))
    assert load_recipe(path).recipe.optim.lr == pytest.approx(1e-3)


def test_unsafe_yaml_tag_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(_with(3, "  name: !!python/object/apply:os.system ['true']"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.issues[0].line == 3
