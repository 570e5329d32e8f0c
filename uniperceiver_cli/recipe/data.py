"""Data sources of a recipe task: one section per on-disk format, discriminated on `format` (torch-free).

Relative paths are resolved at run time against the data root (`run.data_root` or the
`UNIPERCEIVER_DATA_ROOT` environment variable), then against the recipe's folder
(see `uniperceiver_cli.recipe.paths`). The readers live in `uniperceiver_cli.data.formats`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from uniperceiver_cli.recipe.base import PositiveInt, Probability, Section

VideoDecoder = Literal["auto", "torchcodec", "pyav", "frames"]


class _DataBase(Section):
    split: str = Field("train", description="Split to read (e.g. `train`, `val`, `test`).")
    max_samples: PositiveInt | None = Field(
        None, description="Read at most this many samples (quick experiments); null reads all."
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise",
        description="What a corrupt record or media file does: stop with an error naming it, or "
        "skip it and count it in the run log.",
    )
    max_bad_fraction: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="With on_error: skip, stop the run once more than this fraction of the items (0..1) "
        "turned out broken (corrupt, truncated, missing or undecodable).",
    )


class ImageFolderData(_DataBase):
    """Images in one sub-folder per class: `root/<split>/<class>/<image>` (or `root/<class>/...`)."""

    format: Literal["image_folder"] = Field(description="Format tag.")
    root: str = Field(description="Folder that holds the split folders (or the class folders).")
    class_names_file: str | None = Field(
        None,
        description="Text file with one human-readable class name per line, in class-index order; "
        "default: the folder names with `_` replaced by spaces.",
    )


class ImagenetListData(_DataBase):
    """ImageNet list files: `<annotations_dir>/<split>.txt` lines `<relative path> <label>` (SPEC §3.2.1)."""

    format: Literal["imagenet_list"] = Field(description="Format tag.")
    annotations_dir: str = Field(description="Folder holding `train.txt`, `val.txt`, `test.txt`.")
    images_dir: str = Field(
        description="Image root; images are read from `<images_dir>/<split>/<path>`."
    )
    class_names_file: str = Field(description="One class name per line, in label order.")


class CocoCaptionsData(_DataBase):
    """COCO-style caption JSON (`images` + `annotations`, Karpathy splits; SPEC §3.2.4)."""

    format: Literal["coco_captions"] = Field(description="Format tag.")
    annotation_file: str = Field(description="COCO-style caption JSON for this split.")
    images_dir: str = Field(
        description="Image root; an image is `<images_dir>/<file_path>/<file_name>` "
        "(`file_path` optional in the JSON)."
    )


class KarpathyData(_DataBase):
    """Karpathy's `dataset_coco.json` / `dataset_flickr30k.json` (split taken from each image record)."""

    format: Literal["karpathy"] = Field(description="Format tag.")
    annotation_file: str = Field(description="`dataset_coco.json` or `dataset_flickr30k.json`.")
    images_dir: str = Field(description="Image root (`<images_dir>/<filepath>/<filename>`).")
    restval_as_train: bool = Field(True, description="Fold the COCO `restval` split into `train`.")


class JsonlPairsData(_DataBase):
    """JSON lines `{"image": path, "caption": str | [str, ...]}` (web pairs, Flickr30k jsonline)."""

    format: Literal["jsonl_pairs"] = Field(description="Format tag.")
    file: str = Field(description="The JSON-lines file.")
    images_dir: str | None = Field(
        None, description="Root for relative image paths; default: the file's folder."
    )
    image_key: str = Field("image", description="Key of the image path in each record.")
    caption_key: str = Field(
        "caption", description="Key of the caption (string or list of strings)."
    )
    caption_words: bool = Field(
        False, description="The caption value is one caption given as a list of words (CC3M style)."
    )
    question_key: str = Field("question", description="VQA: key of the question.")
    answers_key: str = Field(
        "answers", description="VQA: key of the answers list (one per annotator, repeats allowed)."
    )
    scores_key: str = Field(
        "scores",
        description="VQA: key of the per-answer soft scores in [0, 1]; absent: min(1, count/3).",
    )
    answers_file: str | None = Field(
        None,
        description="VQA: answer vocabulary, one per line; default: the file's distinct answers, most frequent first.",
    )


class WebDatasetData(_DataBase):
    """img2dataset-style tar shards (`<key>.jpg|png` + `<key>.txt|json`), streamed."""

    format: Literal["webdataset"] = Field(description="Format tag.")
    shards: str = Field(
        description="Shard pattern: a glob (`shards/*.tar`) or a brace range (`shards/{00000..00099}.tar`)."
    )
    caption_key: Literal["txt", "json"] = Field("txt", description="Member that holds the caption.")
    shuffle_buffer: PositiveInt = Field(
        1000, description="Samples kept in the streaming shuffle buffer."
    )


class VideoClassificationData(_DataBase):
    """Labelled videos: a CSV `path,label` or the Kinetics layout of SPEC §3.2.8."""

    format: Literal["video_classification"] = Field(description="Format tag.")
    layout: Literal["csv", "kinetics"] = Field("csv", description="Annotation layout.")
    annotation_file: str = Field(
        description="CSV with `path,label` rows (layout csv) or Kinetics `annotation.json` (layout kinetics)."
    )
    videos_dir: str = Field(description="Root of the video files (or frame folders).")
    class_names_file: str | None = Field(
        None,
        description="Class names, one per line (csv) or `<name>\\t<idx>` lines (kinetics "
        "`category_mapping.txt`); default: sorted labels found in the annotations.",
    )
    decoder: VideoDecoder = Field(
        "auto",
        description="Video decoding backend: auto = TorchCodec, falling back to PyAV; `frames` reads "
        "pre-extracted frame folders.",
    )
    extension: str = Field(
        "", description="Extension appended to names in the annotations (kinetics)."
    )


class VideoCaptionsData(_DataBase):
    """MSVD / MSR-VTT COCO-style caption JSON with one video per `images[]` entry (SPEC §3.2.10)."""

    format: Literal["video_captions"] = Field(description="Format tag.")
    annotation_file: str = Field(description="COCO-style JSON (`images[].file_name` = clip name).")
    videos_dir: str = Field(description="Folder of the clips (or frame folders).")
    extension: str = Field(".mp4", description="Extension appended to `file_name` (MSVD: `.avi`).")
    decoder: VideoDecoder = Field(
        "auto", description="Video decoding backend (see video_classification)."
    )


class TextCorpusData(_DataBase):
    """Plain text, one sentence per line, for masked language modelling (SPEC §3.2.3)."""

    format: Literal["text_corpus"] = Field(description="Format tag.")
    file: str = Field(description="The text file.")
    min_words: PositiveInt = Field(
        128,
        description="Consecutive lines are joined until a sample holds at least this many words.",
    )
    mask_prob: Probability = Field(
        0.15, description="Fraction of whole words selected for masking."
    )


class GlueTsvData(_DataBase):
    """GLUE TSVs (fairseq layout `<root>/<TASK>/processed/<split>.tsv`) with cloze templates (SPEC §3.2.9)."""

    format: Literal["glue_tsv"] = Field(description="Format tag.")
    root: str = Field(description="GLUE root folder.")
    glue_task: Literal["SST-2", "CoLA", "MRPC", "QQP", "QNLI", "RTE", "MNLI"] = Field(
        description="Which GLUE task."
    )


class ToyData(_DataBase):
    """The built-in toy world of rendered shapes, generated in memory (no files needed)."""

    format: Literal["toy"] = Field(description="Format tag.")
    num_samples: PositiveInt = Field(256, description="Samples per split.")
    image_size: PositiveInt = Field(32, description="Rendered image side in pixels.")
    num_frames: PositiveInt = Field(4, description="Frames of each toy video.")
    seed: int = Field(0, description="World seed: the same seed always renders the same data.")


DataSpec = Annotated[
    ImageFolderData
    | ImagenetListData
    | CocoCaptionsData
    | KarpathyData
    | JsonlPairsData
    | WebDatasetData
    | VideoClassificationData
    | VideoCaptionsData
    | TextCorpusData
    | GlueTsvData
    | ToyData,
    Field(discriminator="format"),
]

#: Data formats each task type accepts.
FORMATS_FOR_TASK: dict[str, frozenset[str]] = {
    "image_classification": frozenset({"image_folder", "imagenet_list", "toy"}),
    "video_classification": frozenset({"video_classification", "toy"}),
    "image_caption": frozenset({"coco_captions", "karpathy", "jsonl_pairs", "webdataset", "toy"}),
    "image_retrieval": frozenset({"coco_captions", "karpathy", "jsonl_pairs", "webdataset", "toy"}),
    "video_caption": frozenset({"video_captions", "toy"}),
    "video_retrieval": frozenset({"video_captions", "toy"}),
    "mlm": frozenset({"text_corpus", "toy"}),
    "text_classification": frozenset({"glue_tsv", "toy"}),
    "vqa": frozenset({"jsonl_pairs", "toy"}),
}

#: Fields of each format that hold file-system paths (resolved against the data root).
PATH_FIELDS: tuple[str, ...] = (
    "root",
    "annotations_dir",
    "images_dir",
    "annotation_file",
    "class_names_file",
    "file",
    "videos_dir",
    "shards",
    "answers_file",
)
