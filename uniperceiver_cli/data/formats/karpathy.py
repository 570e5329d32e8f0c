"""`karpathy` reader: Karpathy's `dataset_coco.json` / `dataset_flickr30k.json`."""

from __future__ import annotations

from pathlib import Path

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.base import read_json
from uniperceiver_cli.data.formats.captions import (
    CaptionedItem,
    CaptionMode,
    CaptionReader,
    check_mapping,
    image_loader,
)
from uniperceiver_cli.data.options import KarpathyOptions
from uniperceiver_cli.data.text import TextTokenizer
from uniperceiver_cli.data.transforms import ImageTransform


def parse_karpathy(
    path: str | Path, images_dir: str | Path, splits: frozenset[str]
) -> list[CaptionedItem]:
    """Read the images of the given Karpathy splits.

    Each image record needs `filename`, `split` and `sentences` (each with `raw`, or `tokens`);
    `filepath` is optional (Flickr30k has none). The item id is `cocoid`, else `imgid`, else the
    record index.

    Raises:
        DataError: naming the file and record of every malformed entry.
    """
    p = Path(path)
    data = read_json(p, "Karpathy annotation file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{p}: expected an object with an 'images' list (Karpathy format)")
    root = Path(images_dir)
    items: list[CaptionedItem] = []
    for i, raw in enumerate(data["images"]):
        rec = check_mapping(raw, p, i)
        for key in ("filename", "split", "sentences"):
            if key not in rec:
                raise DataError(f"{p}: record {i}: missing '{key}'")
        if rec["split"] not in splits:
            continue
        caps: list[str] = []
        for j, sent in enumerate(rec["sentences"]):
            if isinstance(sent, dict) and isinstance(sent.get("raw"), str):
                caps.append(sent["raw"].strip())
            elif isinstance(sent, dict) and isinstance(sent.get("tokens"), list):
                caps.append(" ".join(str(t) for t in sent["tokens"]))
            else:
                raise DataError(f"{p}: record {i}: sentence {j} has neither 'raw' nor 'tokens'")
        if not caps:
            continue
        item_id = rec.get("cocoid", rec.get("imgid", i))
        items.append(
            CaptionedItem(
                root / (rec.get("filepath") or "") / rec["filename"], item_id, tuple(caps)
            )
        )
    if not items:
        raise DataError(f"{p}: no images with captions in split(s) {sorted(splits)}")
    return items


class KarpathyDataset(CaptionReader):
    """Images with captions from a Karpathy JSON; the split is read from each record.

    Split `train` also takes `restval` when `options.restval_as_train`.

    Args:
        options: the `karpathy` options.
        split: overrides `options.split`.
        transform: uint8 `(3, H, W)` → float `(3, S, S)`; default: scale to [0, 1] only.
        tokenizer: default: the packaged CLIP tokenizer.
        max_text_len: caption tokens kept (incl. EOT); None keeps all.
        caption_mode: default `random` for `train`, else `all`.
    """

    def __init__(
        self,
        options: KarpathyOptions,
        *,
        split: str | None = None,
        transform: ImageTransform | None = None,
        tokenizer: TextTokenizer | None = None,
        max_text_len: int | None = None,
        caption_mode: CaptionMode | None = None,
    ) -> None:
        split = split or options.split
        splits = {split}
        if split == "train" and options.restval_as_train:
            splits.add("restval")
        items = parse_karpathy(options.annotation_file, options.images_dir, frozenset(splits))
        super().__init__(
            options,
            annotation=options.annotation_file,
            items=items,
            load_pixels=image_loader(transform),
            split=split,
            caption_mode=caption_mode,
            tokenizer=tokenizer,
            max_text_len=max_text_len,
        )
