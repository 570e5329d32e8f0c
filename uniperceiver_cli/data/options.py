"""Options of each data format, one frozen dataclass per recipe `data.format` (torch-free).

Field names are exactly those of the recipe sections in `uniperceiver_cli.recipe.data` (minus the
`format` tag), so a recipe section converts with `options_for(spec)`. Paths arrive resolved (absolute
or relative to the working directory); nothing here touches the file system.

Task-level settings (image size, frames per clip, frame stride, text length, evaluation views) are
not data options: the readers take them as separate arguments (`ClipSpec`, `max_text_len`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

OnError = Literal["raise", "skip"]
VideoDecoderName = Literal["auto", "torchcodec", "pyav", "frames"]
GlueTaskName = Literal["SST-2", "CoLA", "MRPC", "QQP", "QNLI", "RTE", "MNLI"]


@dataclass(frozen=True, kw_only=True)
class CommonOptions:
    """Options every format shares.

    Attributes:
        split: split to read (`train`, `val`, `test`, or a format-specific name).
        max_samples: read at most this many samples; None reads all.
        on_error: `raise` stops at the first corrupt record or media file with a `DataError` naming
            it; `skip` logs a warning, counts it and serves another sample instead.
        max_bad_fraction: with `on_error: skip`, the run stops with a `DataError` once more than
            this fraction of the items (0..1) turned out broken (see `uniperceiver_cli.data.health`).
    """

    split: str = "train"
    max_samples: int | None = None
    on_error: OnError = "raise"
    max_bad_fraction: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(
                "expected max_bad_fraction between 0 and 1 (e.g. 0.01 for 1%), found "
                f"{self.max_bad_fraction}"
            )


@dataclass(frozen=True, kw_only=True)
class ImageFolderOptions(CommonOptions):
    """Images in one sub-folder per class: `root/<split>/<class>/<image>` or `root/<class>/<image>`.

    Attributes:
        root: folder holding the split folders (or directly the class folders).
        class_names_file: one human-readable class name per line in class-index order (`a|b` lists
            synonyms; the first is the display name); default: folder names with `_` → space.
    """

    root: str
    class_names_file: str | None = None


@dataclass(frozen=True, kw_only=True)
class ImagenetListOptions(CommonOptions):
    """ImageNet list files `<annotations_dir>/<split>.txt`, lines `<relative path> <label>` (SPEC §3.2.1).

    Attributes:
        annotations_dir: folder holding `train.txt`, `val.txt`, `test.txt`.
        images_dir: image root; an image is `<images_dir>/<split>/<relative path>`.
        class_names_file: one class name per line in label order.
    """

    annotations_dir: str
    images_dir: str
    class_names_file: str


@dataclass(frozen=True, kw_only=True)
class CocoCaptionsOptions(CommonOptions):
    """COCO-style caption JSON `{"images": [...], "annotations": [...]}` (SPEC §3.2.4).

    Attributes:
        annotation_file: the JSON of this split (e.g. `captions_test5k.json`).
        images_dir: image root; an image is `<images_dir>/<file_path>/<file_name>` (`file_path` is
            optional in the JSON).
    """

    annotation_file: str
    images_dir: str


@dataclass(frozen=True, kw_only=True)
class KarpathyOptions(CommonOptions):
    """Karpathy's `dataset_coco.json` / `dataset_flickr30k.json`; each image record names its split.

    Attributes:
        annotation_file: the Karpathy JSON.
        images_dir: image root; an image is `<images_dir>/<filepath>/<filename>`.
        restval_as_train: fold COCO's `restval` images into `train`.
    """

    annotation_file: str
    images_dir: str
    restval_as_train: bool = True


@dataclass(frozen=True, kw_only=True)
class JsonlPairsOptions(CommonOptions):
    """JSON lines `{"image": path, "caption": str | [str, ...]}` (web pairs, Flickr30k jsonline).

    Attributes:
        file: the JSON-lines file.
        images_dir: root of relative image paths; default: the file's folder.
        image_key: key of the image path in each record.
        caption_key: key of the caption: a string or a list of caption strings.
        caption_words: the caption value is one caption given as a list of words (CC3M style):
            words are joined by spaces and "." is appended when the last character is alphanumeric.
        question_key: VQA: key of the question (records `{"image", "question", "answers",
            "scores"}`).
        answers_key: VQA: key of the list of answers (repeats allowed: one per annotator).
        scores_key: VQA: key of the soft score of each answer; absent = `min(1, count / 3)`
            per distinct answer.
        answers_file: VQA: the answer vocabulary, one answer per line (the target set); default:
            the distinct answers of the file, most frequent first.
    """

    file: str
    images_dir: str | None = None
    image_key: str = "image"
    caption_key: str = "caption"
    caption_words: bool = False
    question_key: str = "question"
    answers_key: str = "answers"
    scores_key: str = "scores"
    answers_file: str | None = None


@dataclass(frozen=True, kw_only=True)
class WebDatasetOptions(CommonOptions):
    """img2dataset-style tar shards (`<key>.jpg|png` + `<key>.txt|json`), streamed.

    Attributes:
        shards: a glob (`shards/*.tar`) or a brace range (`shards/{00000..00099}.tar`).
        caption_key: member holding the caption: `txt` (plain text) or `json` (its `captions` list
            when present, else its `caption` field).
        shuffle_buffer: samples kept in the streaming shuffle buffer (training only).
    """

    shards: str
    caption_key: Literal["txt", "json"] = "txt"
    shuffle_buffer: int = 1000


@dataclass(frozen=True, kw_only=True)
class VideoClassificationOptions(CommonOptions):
    """Labelled videos: CSV `path,label` rows or the Kinetics layout of SPEC §3.2.8.

    Attributes:
        layout: `csv` (rows `path,label`, optional header; label = class name or index) or
            `kinetics` (`annotation.json` with `database` entries, videos at
            `<videos_dir>/<subset>/<label>/<name><extension>`).
        annotation_file: the CSV or the Kinetics `annotation.json`.
        videos_dir: root of the videos (or of pre-extracted frame folders).
        class_names_file: csv: one class name per line; kinetics: `category_mapping.txt` lines
            `<name>\\t<idx>`; default: the sorted labels found in the annotations.
        decoder: `auto` (TorchCodec, else PyAV), `torchcodec`, `pyav`, or `frames` (folders of
            images, one folder per video).
        extension: appended to the names in the annotations.
    """

    layout: Literal["csv", "kinetics"] = "csv"
    annotation_file: str
    videos_dir: str
    class_names_file: str | None = None
    decoder: VideoDecoderName = "auto"
    extension: str = ""


@dataclass(frozen=True, kw_only=True)
class VideoCaptionsOptions(CommonOptions):
    """MSVD / MSR-VTT COCO-style caption JSON, one video per `images[]` entry (SPEC §3.2.10).

    Attributes:
        annotation_file: the COCO-style JSON (`images[].file_name` = clip name).
        videos_dir: folder of the clips (or of frame folders).
        extension: appended to `file_name` (MSVD `.avi`, MSR-VTT `.mp4`).
        decoder: decoding backend, as for `VideoClassificationOptions`.
    """

    annotation_file: str
    videos_dir: str
    extension: str = ".mp4"
    decoder: VideoDecoderName = "auto"


@dataclass(frozen=True, kw_only=True)
class TextCorpusOptions(CommonOptions):
    """Plain text, one sentence per line, for masked language modelling (SPEC §3.2.3).

    Attributes:
        file: the text file.
        min_words: consecutive lines are joined until a sample holds at least this many words.
        mask_prob: fraction of whole words selected for masking (80% SPE / 10% random / 10% kept).
    """

    file: str
    min_words: int = 128
    mask_prob: float = 0.15


@dataclass(frozen=True, kw_only=True)
class GlueTsvOptions(CommonOptions):
    """GLUE TSVs in the fairseq layout `<root>/<TASK>/processed/<split>.tsv` (SPEC §3.2.9).

    Attributes:
        root: GLUE root folder.
        glue_task: which task; fixes the columns, the label mapping and the cloze template.
    """

    root: str
    glue_task: GlueTaskName


@dataclass(frozen=True, kw_only=True)
class ToyOptions(CommonOptions):
    """The built-in toy world, rendered in memory (no files).

    Attributes:
        num_samples: samples per split.
        image_size: rendered image side in pixels.
        num_frames: frames rendered per toy video.
        seed: world seed; the same seed always renders the same data.
    """

    num_samples: int = 256
    image_size: int = 32
    num_frames: int = 4
    seed: int = 0


DataOptions = (
    ImageFolderOptions
    | ImagenetListOptions
    | CocoCaptionsOptions
    | KarpathyOptions
    | JsonlPairsOptions
    | WebDatasetOptions
    | VideoClassificationOptions
    | VideoCaptionsOptions
    | TextCorpusOptions
    | GlueTsvOptions
    | ToyOptions
)

#: Options dataclass of each recipe format name.
OPTIONS_BY_FORMAT: dict[str, type[DataOptions]] = {
    "image_folder": ImageFolderOptions,
    "imagenet_list": ImagenetListOptions,
    "coco_captions": CocoCaptionsOptions,
    "karpathy": KarpathyOptions,
    "jsonl_pairs": JsonlPairsOptions,
    "webdataset": WebDatasetOptions,
    "video_classification": VideoClassificationOptions,
    "video_captions": VideoCaptionsOptions,
    "text_corpus": TextCorpusOptions,
    "glue_tsv": GlueTsvOptions,
    "toy": ToyOptions,
}


def format_name(options: DataOptions) -> str:
    """Return the recipe format name of an options object (inverse of `OPTIONS_BY_FORMAT`)."""
    for name, cls in OPTIONS_BY_FORMAT.items():
        if type(options) is cls:
            return name
    raise TypeError(f"expected one of the data options dataclasses, found {type(options).__name__}")


def options_for(spec: Any) -> DataOptions:
    """Convert a recipe data section (or a plain mapping with a `format` key) into its options.

    Fields the options dataclass does not know are rejected, so a renamed recipe field fails loudly.

    Args:
        spec: a Pydantic data section (anything with `model_dump()`), or a mapping.

    Returns:
        The frozen options dataclass of the section's format.

    Raises:
        ValueError: unknown format or fields that the options dataclass lacks.
    """
    raw: Mapping[str, Any] = spec.model_dump() if hasattr(spec, "model_dump") else spec
    values = dict(raw)
    fmt = values.pop("format", None)
    if fmt not in OPTIONS_BY_FORMAT:
        known = ", ".join(sorted(OPTIONS_BY_FORMAT))
        raise ValueError(f"expected a data format among {known}, found {fmt!r}")
    cls = OPTIONS_BY_FORMAT[fmt]
    known_fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known_fields)
    if unknown:
        raise ValueError(
            f"data format {fmt!r} has no option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known_fields))}"
        )
    return cls(**values)
