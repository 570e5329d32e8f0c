"""Evaluation presets: named protocols (`eval --task NAME`, `zero-shot --task NAME`), torch-free.

A preset is one recipe task section (the data format and the task-level settings), the evaluation protocol
(the recipe's `evaluation` section: batch size, beam size, views, ...) and the files it expects under
`--data-root`, in the standard public layouts (SPEC §3.2, §6-§7). `preset_recipe` turns a preset into a validated
`EvalRecipe` / `ZeroShotRecipe`, so a preset and a recipe run through exactly the same evaluation code.
`check_preset_data` says which expected files are missing, with the layout to put them in.

The `toy-*` presets read the built-in toy world in memory (no files), for demos and tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from uniperceiver_cli.recipe.schema import ROOTS

__all__ = [
    "FORMAT_LAYOUTS",
    "EvalPreset",
    "ExpectedPath",
    "PresetDataError",
    "PresetError",
    "check_preset_data",
    "get_preset",
    "list_presets",
    "preset_recipe",
]


class PresetError(KeyError):
    """An unknown preset name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown preset"


class PresetDataError(FileNotFoundError):
    """Files a preset needs are missing under the data root (the message lists them and the layout)."""


@dataclass(frozen=True)
class ExpectedPath:
    """A file or folder a preset reads, relative to the data root.

    Attributes:
        path: relative path (POSIX separators).
        kind: `file` or `dir`.
        what: what it holds, in words.
    """

    path: str
    kind: Literal["file", "dir"]
    what: str


@dataclass(frozen=True)
class EvalPreset:
    """One named evaluation protocol.

    Attributes:
        name: preset name (`coco-retrieval`).
        description: one line for listings.
        task: the recipe task section (a `TaskSpec` mapping).
        evaluation: the recipe `evaluation` section (protocol).
        expects: files and folders read under the data root (empty for the toy world).
        layout: the expected folder layout, as shown in docs and error messages.
        reported: where the paper's number for this protocol is (SPEC section), if any.
    """

    name: str
    description: str
    task: Mapping[str, Any]
    evaluation: Mapping[str, Any]
    expects: tuple[ExpectedPath, ...] = ()
    layout: str = ""
    reported: str = ""


#: The on-disk layout each recipe data format expects (shown with data errors; SPEC §3.2).
FORMAT_LAYOUTS: dict[str, str] = {
    "image_folder": "<root>/<split>/<class>/<image> (or <root>/<class>/<image>)",
    "imagenet_list": "<annotations_dir>/<split>.txt with lines '<relative path> <label>'; images at "
    "<images_dir>/<split>/<relative path>; class_names_file with one name per line",
    "coco_captions": 'annotation_file = {"images": [{"id", "file_name", "file_path"?}], '
    '"annotations": [{"image_id", "caption"}]}; images at <images_dir>/<file_path>/<file_name>',
    "karpathy": "annotation_file = Karpathy's dataset_coco.json / dataset_flickr30k.json; images at "
    "<images_dir>/<filepath>/<filename>",
    "jsonl_pairs": 'file with one JSON object per line {"image": path, "caption": str | [str]}; '
    "relative image paths under images_dir (default: the file's folder)",
    "webdataset": "tar shards of <key>.jpg|png + <key>.txt|json members",
    "video_classification": "csv: annotation_file rows 'path,label', videos under videos_dir; kinetics: "
    "annotation.json + category_mapping.txt, videos at <videos_dir>/<subset>/<label>/<name><extension>",
    "video_captions": "annotation_file COCO-style (images[].file_name = clip name); videos at "
    "<videos_dir>/<file_name><extension>",
    "text_corpus": "file with one sentence per line",
    "glue_tsv": "<root>/<TASK>/processed/<split>.tsv (fairseq-preprocessed GLUE)",
    "toy": "in memory, no files",
}


def _glue(name: str, task: str) -> EvalPreset:
    folder = f"glue/{task}/processed"
    split = (
        "dev_matched" if task == "MNLI" else "dev"
    )  # MNLI is evaluated on dev-matched (SPEC §3.1)
    return EvalPreset(
        name=f"glue-{name}",
        description=f"GLUE {task} dev as a cloze over label words (accuracy"
        + (", MCC" if task == "CoLA" else ", F1" if task in ("MRPC", "QQP") else "")
        + ")",
        task={
            "name": f"glue_{name}",
            "type": "text_classification",
            "batch_size": 64,
            "max_text_len": 256,
            "data": {"format": "glue_tsv", "split": split, "root": "glue", "glue_task": task},
        },
        evaluation={"batch_size": 64},
        expects=(ExpectedPath(f"{folder}/{split}.tsv", "file", f"{task} dev set (fairseq TSV)"),),
        layout=f"<data-root>/{folder}/{split}.tsv   (fairseq-preprocessed GLUE TSV, SPEC §3.2.9)",
        reported="SPEC §9.3 (fine-tuned)",
    )


#: Task settings and evaluation protocol of each task type of the paired presets (SPEC §6-§7).
_CAPTION_DECODING: Mapping[str, Any] = {"beam_size": 2, "max_len": 21, "length_penalty": 2.0}
_VIDEO_CLIPS: Mapping[str, Any] = {"batch_size": 16, "num_frames": 4, "frame_stride": 32}
_PROTOCOLS: dict[str, tuple[Mapping[str, Any], Mapping[str, Any]]] = {
    "image_retrieval": ({"batch_size": 128, "max_text_len": 30}, {"batch_size": 128}),
    "image_caption": (
        {"batch_size": 64, "max_text_len": 30},
        {"batch_size": 64, **_CAPTION_DECODING},
    ),
    "video_retrieval": ({**_VIDEO_CLIPS, "max_text_len": 77}, {"batch_size": 16}),
    "video_caption": (
        {**_VIDEO_CLIPS, "max_text_len": 77},
        {"batch_size": 16, **_CAPTION_DECODING},
    ),
}


@dataclass(frozen=True)
class _Source:
    """The test split of a dataset that a retrieval and a captioning preset both read.

    Attributes:
        data: the recipe `data` section.
        expects: files and folders read under the data root.
        layout: the expected folder layout.
    """

    data: Mapping[str, Any]
    expects: tuple[ExpectedPath, ...]
    layout: str


_COCO = _Source(
    data={
        "format": "coco_captions",
        "split": "test",
        "annotation_file": "mscoco/captions_test5k.json",
        "images_dir": "mscoco",
    },
    expects=(ExpectedPath("mscoco/captions_test5k.json", "file", "Karpathy test 5k captions"),),
    layout=(
        "<data-root>/mscoco/captions_test5k.json   (Karpathy test split, COCO caption format: "
        '{"images": [{"id", "file_name", "file_path"}], "annotations": [{"image_id", "caption"}]})\n'
        "<data-root>/mscoco/val2014/COCO_val2014_000000000042.jpg ...   (images at <file_path>/<file_name>)"
    ),
)
_FLICKR = _Source(
    data={
        "format": "karpathy",
        "split": "test",
        "annotation_file": "flickr30k/dataset_flickr30k.json",
        "images_dir": "flickr30k/flickr30k-images",
    },
    expects=(
        ExpectedPath("flickr30k/dataset_flickr30k.json", "file", "Karpathy's Flickr30k split"),
        ExpectedPath("flickr30k/flickr30k-images", "dir", "the Flickr30k images"),
    ),
    layout=(
        "<data-root>/flickr30k/dataset_flickr30k.json   (Karpathy's split file; records with "
        '"filename", "split", "sentences")\n'
        "<data-root>/flickr30k/flickr30k-images/1000092795.jpg ...   (the 31,783 Flickr30k images)"
    ),
)
_MSVD = _Source(
    data={
        "format": "video_captions",
        "split": "test",
        "annotation_file": "msvd/caption_msvd_test_cocostyle.json",
        "videos_dir": "msvd/videos",
        "extension": ".avi",
    },
    expects=(
        ExpectedPath("msvd/caption_msvd_test_cocostyle.json", "file", "MSVD test captions"),
        ExpectedPath("msvd/videos", "dir", "the MSVD .avi clips"),
    ),
    layout=(
        "<data-root>/msvd/caption_msvd_test_cocostyle.json   (COCO-style: images[].file_name = YouTube "
        "clip name, annotations[].caption)\n"
        "<data-root>/msvd/videos/<file_name>.avi ...   (the MSVD clips, YouTubeClips)"
    ),
)
_MSRVTT = _Source(
    data={
        "format": "video_captions",
        "split": "test",
        "annotation_file": "msrvtt/caption_msrvtt_1k_test_cocostyle.json",
        "videos_dir": "msrvtt/videos",
        "extension": ".mp4",
    },
    expects=(
        ExpectedPath(
            "msrvtt/caption_msrvtt_1k_test_cocostyle.json",
            "file",
            "MSR-VTT 1k-A test, one caption per video",
        ),
        ExpectedPath("msrvtt/videos", "dir", "video<N>.mp4 clips"),
    ),
    layout=(
        "<data-root>/msrvtt/caption_msrvtt_1k_test_cocostyle.json   (COCO-style, "
        "images[].file_name = 'video7010')\n"
        "<data-root>/msrvtt/videos/video7010.mp4 ..."
    ),
)


def _paired(
    name: str, task_type: str, source: _Source, description: str, reported: str
) -> EvalPreset:
    """A retrieval or captioning preset: the `_PROTOCOLS` row of `task_type` run on `source`.

    The recipe task is named after the preset, in snake case (`coco-caption` -> `coco_caption`).
    """
    fields, evaluation = _PROTOCOLS[task_type]
    return EvalPreset(
        name=name,
        description=description,
        task={
            "name": name.replace("-", "_"),
            "type": task_type,
            **fields,
            "data": dict(source.data),
        },
        evaluation=dict(evaluation),
        expects=source.expects,
        layout=source.layout,
        reported=reported,
    )


def _toy(
    name: str,
    task_name: str,
    task_type: str,
    num_samples: int,
    what: str,
    decoding: Mapping[str, Any] | None = None,
) -> EvalPreset:
    """A preset on the built-in toy world's val split (32-pixel images, in memory).

    Video tasks read 4-frame clips in batches of 16, image tasks batches of 64; every task but image
    classification has 16-token texts. `decoding` adds the caption beam search settings.
    """
    video = task_type.startswith("video_")
    batch_size = 16 if video else 64
    task: dict[str, Any] = {"name": task_name, "type": task_type, "batch_size": batch_size}
    data: dict[str, Any] = {
        "format": "toy",
        "split": "val",
        "num_samples": num_samples,
        "image_size": 32,
    }
    if video:
        task["num_frames"] = data["num_frames"] = 4
    if task_type != "image_classification":
        task["max_text_len"] = 16
    task["data"] = data
    return EvalPreset(
        name=name,
        description=f"{what} on the built-in toy world (in memory, no files)",
        task=task,
        evaluation={"batch_size": batch_size, **(decoding or {})},
    )


def _build_presets() -> dict[str, EvalPreset]:
    presets: list[EvalPreset] = [
        EvalPreset(
            name="imagenet-1k",
            description="ImageNet-1k val (50k), class-name targets, Acc@1/Acc@5",
            task={
                "name": "imagenet_1k",
                "type": "image_classification",
                "batch_size": 64,
                "data": {
                    "format": "imagenet_list",
                    "split": "val",
                    "annotations_dir": "imagenet",
                    "images_dir": "imagenet",
                    "class_names_file": "imagenet/class_names.txt",
                },
            },
            evaluation={"batch_size": 64},
            expects=(
                ExpectedPath("imagenet/val.txt", "file", "lines '<image file> <label index>'"),
                ExpectedPath("imagenet/val", "dir", "the 50,000 validation images"),
                ExpectedPath(
                    "imagenet/class_names.txt",
                    "file",
                    "1,000 class names, one per line (CLIP names)",
                ),
            ),
            layout=(
                "<data-root>/imagenet/val.txt   (lines 'ILSVRC2012_val_00000001.JPEG 65')\n"
                "<data-root>/imagenet/val/ILSVRC2012_val_00000001.JPEG ...\n"
                "<data-root>/imagenet/class_names.txt   (1,000 lines in label order, e.g. 'tench')"
            ),
            reported="SPEC §9.1 column IN",
        ),
        EvalPreset(
            name="kinetics-400",
            description="Kinetics-400 validation, 8 frames x 4 temporal x 3 spatial views, Acc@1",
            task={
                "name": "kinetics_400",
                "type": "video_classification",
                "batch_size": 4,
                "num_frames": 8,
                "frame_stride": 32,
                "data": {
                    "format": "video_classification",
                    "layout": "kinetics",
                    "split": "val",
                    "annotation_file": "kinetics400/annotation.json",
                    "videos_dir": "kinetics400/videos",
                    "class_names_file": "kinetics400/category_mapping.txt",
                    "extension": ".mp4",
                },
            },
            evaluation={
                "batch_size": 4,
                "temporal_views": 4,
                "spatial_crops": 3,
                "view_mode": "interleaved",
            },
            expects=(
                ExpectedPath(
                    "kinetics400/annotation.json",
                    "file",
                    '{"database": {<name>: {"subset": "validation", "annotations": {"label": ...}}}}',
                ),
                ExpectedPath(
                    "kinetics400/category_mapping.txt", "file", "400 lines '<class name>\\t<index>'"
                ),
                ExpectedPath("kinetics400/videos/validation", "dir", "<label>/<name>.mp4 clips"),
            ),
            layout=(
                "<data-root>/kinetics400/annotation.json\n"
                "<data-root>/kinetics400/category_mapping.txt   (lines 'abseiling\\t0')\n"
                "<data-root>/kinetics400/videos/validation/<label with _>/<name>.mp4 ..."
            ),
            reported="SPEC §9.1 column K400",
        ),
        _paired(
            "coco-retrieval",
            "image_retrieval",
            _COCO,
            "COCO Karpathy test 5k image-text retrieval, R@1/5/10 both directions",
            "SPEC §9.1 columns Coco i2t / t2i",
        ),
        _paired(
            "flickr30k-retrieval",
            "image_retrieval",
            _FLICKR,
            "Flickr30k Karpathy test 1k image-text retrieval, R@1/5/10 both directions",
            "SPEC §9.1 columns F30k i2t / t2i",
        ),
        _paired(
            "coco-caption",
            "image_caption",
            _COCO,
            "COCO Karpathy test 5k captioning, beam 2, max 21 tokens, length penalty 2.0",
            "SPEC §9.1 column CocoCap (BLEU-4)",
        ),
        _paired(
            "flickr30k-caption",
            "image_caption",
            _FLICKR,
            "Flickr30k Karpathy test captioning, beam 2, max 21 tokens, length penalty 2.0",
            "SPEC §9.1 column F30kCap (BLEU-4)",
        ),
        _paired(
            "msvd-retrieval",
            "video_retrieval",
            _MSVD,
            "MSVD test video-text retrieval (a novel task), 4 frames, R@1/5/10",
            "SPEC §9.1 columns MSVD v2t / t2v",
        ),
        _paired(
            "msvd-caption",
            "video_caption",
            _MSVD,
            "MSVD test video captioning (a novel task), 4 frames, beam 2, length penalty 2.0",
            "SPEC §9.1 column MSVD Cap (BLEU-4)",
        ),
        _paired(
            "msrvtt-retrieval",
            "video_retrieval",
            _MSRVTT,
            "MSR-VTT 1k-A test video-text retrieval, 4 frames, R@1/5/10",
            "none (the reference's MSR-VTT config is unfinished, SPEC §6)",
        ),
        _glue("sst2", "SST-2"),
        _glue("mrpc", "MRPC"),
        _glue("rte", "RTE"),
        _glue("qnli", "QNLI"),
        _glue("qqp", "QQP"),
        _glue("mnli", "MNLI"),
        _glue("cola", "CoLA"),
        _toy(
            "toy-classification",
            "toy_cls",
            "image_classification",
            128,
            "Shape classification (5 classes)",
        ),
        _toy("toy-retrieval", "toy_retrieve", "image_retrieval", 128, "Image-text retrieval"),
        _toy(
            "toy-caption",
            "toy_caption",
            "image_caption",
            64,
            "Image captioning",
            {"beam_size": 2, "max_len": 16, "length_penalty": 0.0},
        ),
        _toy(
            "toy-video-retrieval",
            "toy_video_retrieve",
            "video_retrieval",
            64,
            "Video-text retrieval (a task type the toy quickstart never trains)",
        ),
        _toy(
            "toy-video-caption",
            "toy_video_caption",
            "video_caption",
            32,
            "Video captioning (a task type the toy quickstart never trains)",
            {"beam_size": 2, "max_len": 16, "length_penalty": 2.0},
        ),
    ]
    return {p.name: p for p in presets}


_PRESETS: dict[str, EvalPreset] = _build_presets()


def list_presets() -> list[str]:
    """Names of every evaluation preset, in documentation order."""
    return list(_PRESETS)


def get_preset(name: str) -> EvalPreset:
    """Return the preset `name`.

    Raises:
        PresetError: naming the known presets.
    """
    try:
        return _PRESETS[name]
    except KeyError:
        raise PresetError(
            f"unknown evaluation preset {name!r}; choose one of: {', '.join(_PRESETS)}"
        ) from None


def preset_recipe(
    preset: EvalPreset | str,
    *,
    command: Literal["eval", "zero_shot"] = "eval",
    data_root: str | Path | None = None,
    batch_size: int | None = None,
) -> Any:
    """Build the validated recipe (`EvalRecipe` or `ZeroShotRecipe`) that runs a preset.

    Args:
        preset: the preset or its name.
        command: `eval` or `zero_shot`.
        data_root: folder the preset's relative paths resolve against.
        batch_size: override of the evaluation batch size.

    Returns:
        The recipe root model.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    evaluation = dict(p.evaluation)
    if batch_size is not None:
        evaluation["batch_size"] = batch_size
    run: dict[str, Any] = {"name": p.name}
    if data_root is not None:
        run["data_root"] = str(data_root)
    raw = {"command": command, "run": run, "tasks": [dict(p.task)], "evaluation": evaluation}
    return ROOTS[command].model_validate(raw)


def check_preset_data(preset: EvalPreset | str, data_root: str | Path | None) -> None:
    """Check that every file and folder the preset reads exists under the data root.

    Args:
        preset: the preset or its name.
        data_root: the data root (None: the current folder).

    Raises:
        PresetDataError: listing each missing path (absolute) and the expected layout.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    root = Path(data_root) if data_root is not None else Path.cwd()
    missing: list[str] = []
    for item in p.expects:
        target = root / item.path
        ok = target.is_file() if item.kind == "file" else target.is_dir()
        if not ok:
            missing.append(f"  {target}  ({item.kind}: {item.what})")
    if missing:
        where = (
            "--data-root" if data_root is not None else "--data-root (default: the current folder)"
        )
        raise PresetDataError(
            f"preset {p.name!r} expects these under {where} {root}, but they are missing:\n"
            + "\n".join(missing)
            + f"\nexpected layout:\n{p.layout}\n"
            "pass --data-root to the folder that holds them (see docs/eval.md)"
        )
