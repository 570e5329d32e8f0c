"""Evaluation presets: every preset is a valid recipe, the data check names the missing paths and layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from uniperceiver_cli.engine.evaluate import METRICS_BY_TYPE
from uniperceiver_cli.engine.presets import (
    FORMAT_LAYOUTS,
    PresetDataError,
    PresetError,
    check_preset_data,
    get_preset,
    list_presets,
    preset_recipe,
)
from uniperceiver_cli.recipe.data import FORMATS_FOR_TASK

REQUIRED = [
    "imagenet-1k",
    "kinetics-400",
    "coco-retrieval",
    "flickr30k-retrieval",
    "coco-caption",
    "flickr30k-caption",
    "msvd-retrieval",
    "msvd-caption",
    "msrvtt-retrieval",
    *(f"glue-{t}" for t in ("sst2", "mrpc", "rte", "qnli", "qqp", "mnli", "cola")),
    "toy-classification",
    "toy-retrieval",
    "toy-caption",
    "toy-video-retrieval",
    "toy-video-caption",
]


def test_every_required_preset_exists() -> None:
    assert sorted(list_presets()) == sorted(REQUIRED)


@pytest.mark.parametrize("name", REQUIRED)
def test_preset_is_a_valid_recipe(name: str) -> None:
    preset = get_preset(name)
    for command in ("eval", "zero_shot"):
        recipe = preset_recipe(name, command=command, data_root="/data", batch_size=3)  # type: ignore[arg-type]
        assert recipe.command == command
        assert recipe.run.data_root == "/data"
        assert recipe.evaluation.batch_size == 3
        (task,) = recipe.tasks
        assert task.type in METRICS_BY_TYPE
        assert task.data.format in FORMATS_FOR_TASK[task.type]
        assert task.data.format in FORMAT_LAYOUTS
    if name.startswith("toy-"):
        assert preset.expects == ()
    else:
        assert preset.expects and preset.layout.startswith("<data-root>/")
        # every expected path is shown in the layout users see
        assert all(e.path in preset.layout for e in preset.expects)


def test_protocols_follow_the_paper() -> None:
    k400 = preset_recipe("kinetics-400")
    assert (k400.evaluation.temporal_views, k400.evaluation.spatial_crops) == (4, 3)
    assert k400.tasks[0].num_frames == 8
    coco = preset_recipe("coco-caption").evaluation
    assert (coco.beam_size, coco.max_len, coco.length_penalty) == (2, 21, 2.0)
    assert preset_recipe("coco-retrieval").tasks[0].max_text_len == 30
    assert preset_recipe("msvd-retrieval").tasks[0].num_frames == 4
    assert preset_recipe("glue-mnli").tasks[0].data.split == "dev_matched"


def test_missing_data_names_paths_and_layout(tmp_path: Path) -> None:
    with pytest.raises(PresetDataError) as info:
        check_preset_data("coco-retrieval", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "mscoco" / "captions_test5k.json") in message
    assert "expected layout" in message and "file_path" in message
    ann = tmp_path / "mscoco" / "captions_test5k.json"
    ann.parent.mkdir(parents=True)
    ann.write_text("{}")
    check_preset_data("coco-retrieval", tmp_path)
    with pytest.raises(PresetDataError, match="flickr30k-images"):
        check_preset_data("flickr30k-retrieval", tmp_path)
    check_preset_data("toy-caption", tmp_path / "nowhere")


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(PresetError, match="toy-retrieval"):
        get_preset("coco-retreival")
