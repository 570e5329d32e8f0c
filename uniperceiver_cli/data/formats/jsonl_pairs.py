"""`jsonl_pairs` reader: JSON lines `{"image": path, "caption": str | [str, ...]}` (SPEC §3.2.5-6)."""

from __future__ import annotations

from pathlib import Path

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.captions import (
    CaptionedItem,
    CaptionMode,
    CaptionReader,
    image_loader,
    read_jsonl_records,
    words_to_caption,
)
from uniperceiver_cli.data.options import JsonlPairsOptions
from uniperceiver_cli.data.text import TextTokenizer
from uniperceiver_cli.data.transforms import ImageTransform


def parse_jsonl_pairs(options: JsonlPairsOptions) -> list[CaptionedItem]:
    """Read the pairs file: one image per line with one or several captions.

    A `zip@` marker in the path (`train_image.zip@/000.jpg`) is dropped, as in the reference
    without zip mode. The item id is the record's `id` if present, else the line index.

    Raises:
        DataError: naming the file and line of every malformed record.
    """
    p = Path(options.file)
    root = Path(options.images_dir) if options.images_dir else p.parent
    items: list[CaptionedItem] = []
    for i, rec in read_jsonl_records(p, "pairs file"):
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


class JsonlPairsDataset(CaptionReader):
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
        super().__init__(
            options,
            annotation=options.file,
            items=items,
            load_pixels=image_loader(transform),
            split=split,
            caption_mode=caption_mode,
            tokenizer=tokenizer,
            max_text_len=max_text_len,
        )
