"""Shared machinery of the caption readers (images or videos paired with captions).

`CaptionedItems` is the parsed annotation (one entry per image or video, with all its captions);
`VisualTextDataset` turns it into `VisualTextSample`s in one of three caption modes (`CaptionReader`
adds the settings every options-driven reader shares, `image_loader` the image media loader):

* `random`: one item per sample, one of its captions drawn at random (training default);
* `pairs`: one (item, caption) pair per sample, all pairs flattened (MSVD-style training);
* `all`: one item per sample with all its captions (evaluation default: caption references and
  retrieval targets).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.base import MapDataset, read_json
from uniperceiver_cli.data.images import read_image
from uniperceiver_cli.data.options import CommonOptions
from uniperceiver_cli.data.samples import VisualTextSample, collate_visual_text
from uniperceiver_cli.data.text import TextTokenizer, default_tokenizer, encode_caption
from uniperceiver_cli.data.transforms import ImageTransform, to_float_image

logger = logging.getLogger(__name__)

CaptionMode = Literal["random", "pairs", "all"]


@dataclass(frozen=True)
class CaptionedItem:
    """One image or video with its captions.

    Attributes:
        path: media file (or frame folder).
        item_id: id in the annotation file.
        captions: the captions (at least one).
    """

    path: Path
    item_id: int | str
    captions: tuple[str, ...]


def words_to_caption(words: list[Any]) -> str:
    """Join a caption given as a word list (CC3M style) and end it with " ." when it ends in a word."""
    text = " ".join(str(w) for w in words).strip()
    if text and text[-1].isalnum():
        text += " ."
    return text


def parse_coco_captions(
    path: str | Path,
    media_root: str | Path,
    *,
    extension: str = "",
) -> list[CaptionedItem]:
    """Parse a COCO-style caption JSON (`images` + `annotations`, SPEC §3.2.4 / §3.2.10).

    Media path = `<media_root>/<file_path>/<file_name><extension>` (`file_path` optional).
    Images without any caption are dropped (with a log line).

    Raises:
        DataError: naming the file and the record for every malformed entry.
    """
    p = Path(path)
    data = read_json(p, "caption annotation file")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{p}: expected a COCO-style object with 'images' and 'annotations' lists")
    images, annotations = data["images"], data["annotations"]
    for key, value in (("images", images), ("annotations", annotations)):
        if not isinstance(value, list):
            raise DataError(f"{p}: '{key}' must be a list, found {type(value).__name__}")
    root = Path(media_root)
    order: list[int | str] = []
    paths: dict[int | str, Path] = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            raise DataError(
                f"{p}: images record {i}: expected an object, found {type(img).__name__}"
            )
        for key in ("id", "file_name"):
            if key not in img:
                raise DataError(f"{p}: images record {i}: missing '{key}'")
        _check_id(img["id"], p, f"images record {i}", "id")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise DataError(
                f"{p}: images record {i} (id {img['id']!r}): 'file_name' must be a non-empty "
                f"string, found {img['file_name']!r}"
            )
        sub = img.get("file_path") or ""
        if not isinstance(sub, str):
            raise DataError(
                f"{p}: images record {i} (id {img['id']!r}): 'file_path' must be a string, "
                f"found {sub!r}"
            )
        media = root / sub / f"{img['file_name']}{extension}"
        if img["id"] in paths:
            if paths[img["id"]] != media:
                raise DataError(
                    f"{p}: images record {i}: id {img['id']!r} already names "
                    f"{paths[img['id']]}, now {media}; ids must be unique"
                )
            continue
        paths[img["id"]] = media
        order.append(img["id"])
    captions: dict[int | str, list[str]] = {k: [] for k in order}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise DataError(
                f"{p}: annotations record {i}: expected an object, found {type(ann).__name__}"
            )
        for key in ("image_id", "caption"):
            if key not in ann:
                raise DataError(f"{p}: annotations record {i}: missing '{key}'")
        _check_id(ann["image_id"], p, f"annotations record {i}", "image_id")
        if ann["image_id"] not in captions:
            raise DataError(
                f"{p}: annotations record {i}: image_id {ann['image_id']!r} is not in 'images'"
            )
        if not isinstance(ann["caption"], str):
            raise DataError(
                f"{p}: annotations record {i}: 'caption' must be a string, found "
                f"{type(ann['caption']).__name__} {ann['caption']!r}"
            )
        captions[ann["image_id"]].append(ann["caption"].strip())
    items = [CaptionedItem(paths[k], k, tuple(captions[k])) for k in order if captions[k]]
    dropped = len(order) - len(items)
    if dropped:
        logger.info("%s: %d of %d entries have no caption and are skipped", p, dropped, len(order))
    if not items:
        raise DataError(f"{p}: no captioned entries found")
    return items


def _check_id(value: Any, source: Path, where: str, field: str) -> None:
    """Ids are integers or strings (JSON numbers with a fraction, lists, null are errors)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DataError(
            f"{source}: {where}: '{field}' must be an integer or a string, found "
            f"{type(value).__name__} {value!r}"
        )


class VisualTextDataset(MapDataset[VisualTextSample]):
    """Items with captions → `VisualTextSample`s (see the module docstring for caption modes).

    Args:
        source: annotation file name for messages.
        items: the parsed items.
        load_pixels: reads and transforms the media of an item (uint8 decode + transform).
        caption_mode: `random`, `pairs` or `all`.
        tokenizer: text tokenizer; default: the packaged CLIP tokenizer.
        max_text_len: caption tokens kept including EOT (SPEC: 30-50 for captions).
        on_error: `raise` or `skip`.
        max_samples: cap on the samples served.
        max_bad_fraction: largest tolerated fraction of broken items with `skip`.
    """

    collate_fn = staticmethod(collate_visual_text)

    def __init__(
        self,
        *,
        source: str,
        items: list[CaptionedItem],
        load_pixels: Callable[[CaptionedItem], Tensor],
        caption_mode: CaptionMode,
        tokenizer: TextTokenizer | None,
        max_text_len: int | None,
        on_error: Any,
        max_samples: int | None,
        max_bad_fraction: float = 0.01,
    ) -> None:
        super().__init__(
            source=source,
            on_error=on_error,
            max_samples=max_samples,
            max_bad_fraction=max_bad_fraction,
        )
        if caption_mode not in ("random", "pairs", "all"):
            raise ValueError(f"expected caption_mode random, pairs or all, found {caption_mode!r}")
        self.items = items
        self.caption_mode = caption_mode
        self._load_pixels = load_pixels
        self._tokenizer = tokenizer
        self.max_text_len = max_text_len
        self._pairs: list[tuple[int, int]] = (
            [(i, c) for i, it in enumerate(items) for c in range(len(it.captions))]
            if caption_mode == "pairs"
            else []
        )

    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer (the packaged CLIP tokenizer unless one was given)."""
        if self._tokenizer is None:
            self._tokenizer = default_tokenizer()
        return self._tokenizer

    def _num_items(self) -> int:
        return len(self._pairs) if self.caption_mode == "pairs" else len(self.items)

    def item_of(self, position: int) -> int:
        """Index in `items` of the image or video served at `position`."""
        return self._pairs[position][0] if self.caption_mode == "pairs" else position

    def item_name(self, index: int) -> str:
        """The media file of the sample at `index`."""
        return str(self.items[self.item_of(index)].path)

    def references(self) -> dict[int | str, list[str]]:
        """All captions of every item served (capped by `max_samples`), by item id."""
        if self.caption_mode == "pairs":
            ids = {self._pairs[i][0] for i in range(len(self))}
            chosen = [self.items[i] for i in sorted(ids)]
        else:
            chosen = self.items[: len(self)]
        return {it.item_id: list(it.captions) for it in chosen}

    def load(self, index: int) -> VisualTextSample:
        if self.caption_mode == "pairs":
            item_index, cap_index = self._pairs[index]
            item = self.items[item_index]
            captions: tuple[str, ...] = (item.captions[cap_index],)
        else:
            item = self.items[index]
            if self.caption_mode == "random":
                pick = int(torch.randint(len(item.captions), (1,)))
                captions = (item.captions[pick],)
            else:
                captions = item.captions
        pixels = self._load_pixels(item)
        ids = tuple(encode_caption(self.tokenizer, c, self.max_text_len) for c in captions)
        return VisualTextSample(
            pixels=pixels, text_ids=ids, captions=captions, item_id=item.item_id, index=index
        )


def default_caption_mode(split: str) -> CaptionMode:
    """`random` for the train split, `all` otherwise."""
    return "random" if split == "train" else "all"


def check_mapping(record: Any, source: Path, index: int) -> Mapping[str, Any]:
    """Raise a `DataError` unless a JSON record is an object."""
    if not isinstance(record, dict):
        raise DataError(
            f"{source}: record {index}: expected a JSON object, found {type(record).__name__}"
        )
    return record


def read_jsonl_records(path: Path, what: str) -> list[tuple[int, Mapping[str, Any]]]:
    """Read a JSON-lines file into `(line index, object)` pairs, skipping blank lines.

    Args:
        path: the file (the `file` of a `jsonl_pairs` section).
        what: what the file holds, for the not-found message (e.g. "pairs file").

    Raises:
        DataError: the file is missing, or a line is not valid JSON or not a JSON object.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: {what} not found; check data.file") from exc
    records: list[tuple[int, Mapping[str, Any]]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append((i, check_mapping(json.loads(line), path, i)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: record {i}: not valid JSON ({exc.msg})") from exc
    return records


def image_loader(transform: ImageTransform | None) -> Callable[[CaptionedItem], Tensor]:
    """Media loader of the image caption readers: decode an item's image, then transform it.

    Args:
        transform: uint8 `(3, H, W)` → float `(3, S, S)`; None scales to [0, 1] only.
    """
    tf = transform or to_float_image

    def load_pixels(item: CaptionedItem) -> Tensor:
        return tf(read_image(item.path))

    return load_pixels


class CaptionReader(VisualTextDataset):
    """A `VisualTextDataset` configured by a reader's typed options.

    Messages name the annotation file; the caption mode defaults by split (`random` for `train`,
    else `all`); `on_error`, `max_samples` and `max_bad_fraction` come from the options.

    Args:
        options: the reader's options.
        annotation: the annotation file (its name is the source in messages).
        items: the parsed items.
        load_pixels: reads and transforms the media of an item.
        split: the split read (decides the default caption mode).
        caption_mode: explicit caption mode, or None for the split's default.
        tokenizer: default: the packaged CLIP tokenizer.
        max_text_len: caption tokens kept (incl. EOT); None keeps all.
    """

    def __init__(
        self,
        options: CommonOptions,
        *,
        annotation: str | Path,
        items: list[CaptionedItem],
        load_pixels: Callable[[CaptionedItem], Tensor],
        split: str,
        caption_mode: CaptionMode | None,
        tokenizer: TextTokenizer | None,
        max_text_len: int | None,
    ) -> None:
        super().__init__(
            source=Path(annotation).name,
            items=items,
            load_pixels=load_pixels,
            caption_mode=caption_mode or default_caption_mode(split),
            tokenizer=tokenizer,
            max_text_len=max_text_len,
            on_error=options.on_error,
            max_samples=options.max_samples,
            max_bad_fraction=options.max_bad_fraction,
        )
