"""`coco_captions` reader: COCO-style caption JSON with images (SPEC §3.2.4)."""

from __future__ import annotations

from uniperceiver_cli.data.formats.captions import (
    CaptionMode,
    CaptionReader,
    image_loader,
    parse_coco_captions,
)
from uniperceiver_cli.data.options import CocoCaptionsOptions
from uniperceiver_cli.data.text import TextTokenizer
from uniperceiver_cli.data.transforms import ImageTransform


class CocoCaptionsDataset(CaptionReader):
    """Images with captions from one COCO-style JSON (`captions_train113k.json`, ...).

    Args:
        options: the `coco_captions` options (the JSON holds one split; `split` picks the default
            caption mode only).
        split: overrides `options.split`.
        transform: uint8 `(3, H, W)` → float `(3, S, S)`; default: scale to [0, 1] only.
        tokenizer: default: the packaged CLIP tokenizer.
        max_text_len: caption tokens kept (incl. EOT); None keeps all.
        caption_mode: default `random` for `train`, else `all`.
    """

    def __init__(
        self,
        options: CocoCaptionsOptions,
        *,
        split: str | None = None,
        transform: ImageTransform | None = None,
        tokenizer: TextTokenizer | None = None,
        max_text_len: int | None = None,
        caption_mode: CaptionMode | None = None,
    ) -> None:
        split = split or options.split
        items = parse_coco_captions(options.annotation_file, options.images_dir)
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
