"""`video_captions` reader: MSVD / MSR-VTT COCO-style caption JSON (SPEC §3.2.10)."""

from __future__ import annotations

from torch import Tensor

from uniperceiver_cli.data.formats.captions import (
    CaptionedItem,
    CaptionMode,
    CaptionReader,
    parse_coco_captions,
)
from uniperceiver_cli.data.options import VideoCaptionsOptions
from uniperceiver_cli.data.text import TextTokenizer
from uniperceiver_cli.data.transforms import VideoTransform, to_float_image
from uniperceiver_cli.data.video import ClipSpec, open_video, read_clip, resolve_backend


class VideoCaptionsDataset(CaptionReader):
    """Videos with captions → `VisualTextSample`s with clips `(T, 3, S, S)` or views.

    A video is `<videos_dir>/<file_name><extension>` (a folder there is read as frames).

    Args:
        options: the `video_captions` options.
        split: overrides `options.split`.
        transform: uint8 `(T, 3, H, W)` → float clip; default: scale to [0, 1] only.
        clip: frames, stride and evaluation views.
        tokenizer: default: the packaged CLIP tokenizer.
        max_text_len: caption tokens kept (incl. EOT); None keeps all.
        caption_mode: default `random` for `train`, else `all` (MSVD training uses `pairs`).
        train: random clips (default: split == "train") instead of evaluation views.
    """

    def __init__(
        self,
        options: VideoCaptionsOptions,
        *,
        split: str | None = None,
        transform: VideoTransform | None = None,
        clip: ClipSpec | None = None,
        tokenizer: TextTokenizer | None = None,
        max_text_len: int | None = None,
        caption_mode: CaptionMode | None = None,
        train: bool | None = None,
    ) -> None:
        split = split or options.split
        items = parse_coco_captions(
            options.annotation_file, options.videos_dir, extension=options.extension
        )
        self.clip = clip or ClipSpec(num_frames=4)
        self.train = split == "train" if train is None else train
        self.backend = resolve_backend(options.decoder)
        tf = transform or to_float_image

        def load_pixels(item: CaptionedItem) -> Tensor:
            source = open_video(item.path, self.backend)
            try:
                return read_clip(source, self.clip, train=self.train, transform=tf)
            finally:
                source.close()

        super().__init__(
            options,
            annotation=options.annotation_file,
            items=items,
            load_pixels=load_pixels,
            split=split,
            caption_mode=caption_mode,
            tokenizer=tokenizer,
            max_text_len=max_text_len,
        )
