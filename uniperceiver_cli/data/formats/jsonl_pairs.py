"""`jsonl_pairs` reader: JSON lines `{"image": path, "caption": str | [str, ...]}` (SPEC §3.2.5-6)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.captions import (
    CaptionedItem,
    CaptionMode,
    VisualTextDataset,
    check_mapping,
    default_caption_mode,
    words_to_caption,
)
from uniperceiver_cli.data.images import read_image
from uniperceiver_cli.data.options import JsonlPairsOptions
from uniperceiver_cli.data.text import TextTokenizer
from uniperceiver_cli.data.transforms import ImageTransform, to_float_image


def parse_jsonl_pairs(options: JsonlPairsOptions) -> list[CaptionedItem]:
    """Read the pairs file: one image per line with one or several captions.

    A `zip@` marker in the path (`train_image.zip@/000.jpg`) is dropped, as in the reference
    without zip mode. The item id is the record's `id` if present, else the line index.

    Raises:
        DataError: naming the file and line of every malformed record.
    """
    p = Path(options.file)
    root = Path(options.images_dir) if options.images_dir else p.parent
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{p}: pairs file not found; check data.file") from exc
    items: list[CaptionedItem] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = check_mapping(json.loads(line), p, i)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}: record {i}: not valid JSON ({exc.msg})") from exc
        for key in (options.image_key, options.caption_key):
            if key not in rec:
                raise DataError(f"{p}: record {i}: missing '{key}'")
        image = str(rec[options.image_key]).replace(".zip@", "")
        value = rec[options.caption_key]
        if isinstance(value, str):
            caps = [value.strip()]
        elif isinstance(value, list) and options.caption_words:
            caps = [words_to_caption(value)]
        elif isinstance(value, list) and all(isinstance(c, str) for c in value):
            caps = [c.strip() for c in value]
        else:
            raise DataError(
                f"{p}: record {i}: '{options.caption_key}' must be a string or a list of strings"
            )
        caps = [c for c in caps if c]
        if not caps:
            raise DataError(f"{p}: record {i}: empty caption")
        items.append(CaptionedItem(root / image.lstrip("/"), rec.get("id", i), tuple(caps)))
    if not items:
        raise DataError(f"{p}: no records")
    return items


class JsonlPairsDataset(VisualTextDataset):
    """Image-caption pairs from a JSON-lines file.

    Args:
        options: the `jsonl_pairs` options.
        split: overrides `options.split` (picks the default caption mode only).
        transform: uint8 `(3, H, W)` → float `(3, S, S)`; default: scale to [0, 1] only.
        tokenizer: default: the packaged CLIP tokenizer.
        max_text_len: caption tokens kept (incl. EOT); None keeps all.
        caption_mode: default `random` for `train`, else `all`.
    """

    def __init__(
        self,
        options: JsonlPairsOptions,
        *,
        split: str | None = None,
        transform: ImageTransform | None = None,
        tokenizer: TextTokenizer | None = None,
        max_text_len: int | None = None,
        caption_mode: CaptionMode | None = None,
    ) -> None:
        split = split or options.split
        items = parse_jsonl_pairs(options)
        tf = transform or to_float_image

        def load_pixels(item: CaptionedItem) -> Tensor:
            return tf(read_image(item.path))

        super().__init__(
            source=Path(options.file).name,
            items=items,
            load_pixels=load_pixels,
            caption_mode=caption_mode or default_caption_mode(split),
            tokenizer=tokenizer,
            max_text_len=max_text_len,
            on_error=options.on_error,
            max_samples=options.max_samples,
            max_bad_fraction=options.max_bad_fraction,
        )
