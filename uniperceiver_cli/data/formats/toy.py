"""`toy` reader: the built-in toy world served in memory for any task type (no files).

Per task type: image classification (class = shape), video classification (class = motion),
image/video caption and retrieval (templated captions), MLM (toy sentences, whole-word masked),
text classification (the toy sentence-pair task: does sentence 2 agree with sentence 1? label
words `no`, `yes`, RTE's template), VQA (questions about the shape, colour, size and position of
each toy image, answered from `ToyWorld.vqa_answers`). Toy videos are rendered with `options.num_frames` frames; a
clip takes `clip.num_frames` of them evenly spaced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from uniperceiver_cli.data.formats.base import MapDataset
from uniperceiver_cli.data.formats.captions import CaptionMode, default_caption_mode
from uniperceiver_cli.data.formats.glue_tsv import ClozeTemplate
from uniperceiver_cli.data.formats.vqa import make_vqa_sample
from uniperceiver_cli.data.options import ToyOptions
from uniperceiver_cli.data.samples import (
    ClassificationSample,
    MLMSample,
    Sample,
    TextClassificationSample,
    VisualTextSample,
    VQASample,
    collate,
)
from uniperceiver_cli.data.text import (
    EOT_TEXT,
    TextTokenizer,
    default_tokenizer,
    encode_caption,
    encode_words,
    split_words,
    truncate_keep_last,
    whole_word_mask,
)
from uniperceiver_cli.data.toy import ToyWorld
from uniperceiver_cli.data.transforms import to_float_image
from uniperceiver_cli.data.video import ClipSpec

ToyTask = Literal[
    "image_classification",
    "video_classification",
    "image_caption",
    "image_retrieval",
    "video_caption",
    "video_retrieval",
    "mlm",
    "text_classification",
    "vqa",
]
TOY_TASKS: tuple[str, ...] = get_args(ToyTask)


class ToyDataset(MapDataset[Sample]):
    """In-memory toy data for one task type.

    Args:
        options: the `toy` options.
        task_type: recipe task type.
        split: overrides `options.split`; every split is a different stream of the same world.
        transform: image `(3, H, W)` or clip `(T, 3, H, W)` uint8 → float; default: scale only.
        clip: frames and evaluation views of toy videos.
        tokenizer: default: the packaged CLIP tokenizer.
        max_text_len: text tokens kept (captions incl. EOT, MLM and cloze sequences).
        caption_mode: caption tasks: default `random` for train, else `all`.
        mask_prob: MLM word selection probability.
        train: training behaviour (default: split == "train").
    """

    collate_fn = staticmethod(collate)

    def __init__(
        self,
        options: ToyOptions,
        *,
        task_type: str,
        split: str | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
        clip: ClipSpec | None = None,
        tokenizer: TextTokenizer | None = None,
        max_text_len: int = 32,
        caption_mode: CaptionMode | None = None,
        mask_prob: float = 0.15,
        train: bool | None = None,
    ) -> None:
        if task_type not in TOY_TASKS:
            raise ValueError(
                f"expected a toy task type among {', '.join(TOY_TASKS)}, found {task_type!r}"
            )
        split = split or options.split
        super().__init__(
            source=f"toy[{task_type}/{split}]",
            on_error=options.on_error,
            max_samples=options.max_samples,
            max_bad_fraction=options.max_bad_fraction,
        )
        self.options = options
        self.task_type = task_type
        self.split = split
        self.world = ToyWorld(
            options.seed, image_size=options.image_size, num_frames=options.num_frames
        )
        self.transform: Callable[[Tensor], Tensor] = transform or to_float_image
        self.clip = clip or ClipSpec(num_frames=options.num_frames)
        self._tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.caption_mode: CaptionMode = caption_mode or default_caption_mode(split)
        self.mask_prob = mask_prob
        self.train = split == "train" if train is None else train
        self._template: ClozeTemplate | None = None

    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer (the packaged CLIP tokenizer unless one was given)."""
        if self._tokenizer is None:
            self._tokenizer = default_tokenizer()
        return self._tokenizer

    @property
    def class_synonyms(self) -> tuple[tuple[str, ...], ...]:
        """Class names (classification) or label words (text classification), one tuple each."""
        if self.task_type == "image_classification":
            return tuple((c,) for c in self.world.image_classes)
        if self.task_type == "video_classification":
            return tuple((c,) for c in self.world.video_classes)
        if self.task_type == "text_classification":
            return tuple((w,) for w in self.world.pair_label_words)
        return ()

    @property
    def class_names(self) -> tuple[str, ...]:
        """Display names of the classes (empty for caption and MLM tasks)."""
        return tuple(s[0] for s in self.class_synonyms)

    @property
    def label_words(self) -> tuple[str, ...]:
        """Label words of the toy text classification task."""
        return self.world.pair_label_words

    @property
    def answers(self) -> tuple[str, ...]:
        """Answer vocabulary of the toy VQA task."""
        return self.world.vqa_answers

    @property
    def labels(self) -> list[int] | None:
        """Class (classification, pairs) or answer index (VQA) of every item; None otherwise.

        Used by `data_fraction_subset` to draw a stratified subset.
        """
        n, t, split = len(self), self.task_type, self.split
        if t == "image_classification":
            return [self.world.image_scene(i, split).label for i in range(n)]
        if t == "video_classification":
            return [self.world.video_scene(i, split).label for i in range(n)]
        if t == "text_classification":
            return [self.world.pair(i, split).label for i in range(n)]
        if t == "vqa":
            index = {a: k for k, a in enumerate(self.world.vqa_answers)}
            return [index[self.world.vqa(i, split).answers[0]] for i in range(n)]
        return None

    def references(self) -> dict[int | str, list[str]]:
        """All captions of every item served, by item id (caption tasks)."""
        video = self.task_type.startswith("video")
        out: dict[int | str, list[str]] = {}
        for i in range(len(self)):
            scene = (
                self.world.video_scene(i, self.split)
                if video
                else self.world.image_scene(i, self.split)
            )
            out[i] = list(scene.captions)
        return out

    def _num_items(self) -> int:
        return self.options.num_samples

    def _clip(self, index: int) -> Tensor:
        frames, _ = self.world.video(index, self.split)
        total = int(frames.shape[0])
        pick = torch.linspace(0, total - 1, self.clip.num_frames).round().to(torch.int64)
        clip = frames[pick]
        views = 1 if self.train else self.clip.temporal_views
        # The toy motion is uniform, so every temporal view shows the same clip.
        outs: list[Tensor] = [self.transform(clip) for _ in range(views)]
        if len(outs) == 1:
            return outs[0]
        return torch.cat([o if o.ndim == 5 else o.unsqueeze(0) for o in outs])

    def load(self, index: int) -> Sample:
        t = self.task_type
        if t == "image_classification":
            image, scene = self.world.image(index, self.split)
            pixels = self.transform(image)
            return ClassificationSample(pixels=pixels, label=scene.label, index=index)
        if t == "video_classification":
            label = self.world.video_scene(index, self.split).label
            return ClassificationSample(pixels=self._clip(index), label=label, index=index)
        if t in ("image_caption", "image_retrieval", "video_caption", "video_retrieval"):
            if t.startswith("video"):
                pixels = self._clip(index)
                captions = self.world.video_scene(index, self.split).captions
            else:
                image, iscene = self.world.image(index, self.split)
                pixels = self.transform(image)
                captions = iscene.captions
            if self.caption_mode != "all":
                captions = (captions[int(torch.randint(len(captions), (1,)))],)
            ids = tuple(encode_caption(self.tokenizer, c, self.max_text_len) for c in captions)
            return VisualTextSample(
                pixels=pixels, text_ids=ids, captions=captions, item_id=index, index=index
            )
        if t == "mlm":
            return self._mlm(index)
        if t == "vqa":
            return self._vqa(index)
        return self._pair(index)

    def _vqa(self, index: int) -> VQASample:
        image, _ = self.world.image(index, self.split)
        q = self.world.vqa(index, self.split)
        return make_vqa_sample(
            image,
            question=q.question,
            answers=q.answers,
            scores=q.scores,
            answer_index={a: k for k, a in enumerate(self.world.vqa_answers)},
            tokenizer=self.tokenizer,
            max_text_len=max(self.max_text_len, 3),
            transform=self.transform,
            train=self.train,
            item_id=index,
            index=index,
        )

    def _mlm(self, index: int) -> MLMSample:
        words: list[str] = []
        line = index
        while len(words) < self.max_text_len:
            words.extend(split_words(self.world.sentence(line, self.split)))
            words.append(EOT_TEXT)
            line += 1
        ids, labels = whole_word_mask(encode_words(self.tokenizer, words), mask_prob=self.mask_prob)
        keep = truncate_keep_last(list(range(int(ids.shape[0]))), self.max_text_len)
        return MLMSample(ids=ids[keep], labels=labels[keep], index=index)

    def _pair(self, index: int) -> TextClassificationSample:
        if self._template is None:
            self._template = ClozeTemplate("TOY", self.tokenizer, max(self.max_text_len, 8))
        pair = self.world.pair(index, self.split)
        ids, slot = self._template.build((pair.first, pair.second))
        return TextClassificationSample(
            ids=torch.tensor(ids, dtype=torch.int64), slot=slot, label=pair.label, index=index
        )
