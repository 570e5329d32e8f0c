"""`webdataset` reader: img2dataset-style tar shards streamed as `VisualTextSample`s.

A sample is the run of consecutive tar members sharing a key (`<key>.jpg` + `<key>.txt` +
`<key>.json`, key = member path up to the first dot of its file name). Shards are split across
ranks and DataLoader workers (whole shards when there are at least as many shards as consumers,
else every consumer reads all shards and keeps every n-th sample). Training streams forever with
per-epoch shard shuffling and a shuffle buffer; evaluation makes one ordered pass. A corrupt
member, image or shard raises a `DataError` naming shard and member, or with `on_error: skip` is
logged and counted in `skipped` (per process) while the stream goes on; the next sample served
carries the `SkippedItem`s in its `skipped` field, and past `max_bad_fraction` of the records read
(judged after `health.STREAM_MIN_SEEN` records, or at the end of an evaluation pass) the stream
stops with a `DataError`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.health import BadItemLedger, SkippedItem
from uniperceiver_cli.data.images import decode_image_bytes
from uniperceiver_cli.data.options import WebDatasetOptions
from uniperceiver_cli.data.sampler import mix_seed, seeded_scope
from uniperceiver_cli.data.samples import VisualTextSample, collate_visual_text
from uniperceiver_cli.data.text import TextTokenizer, default_tokenizer, encode_caption
from uniperceiver_cli.data.transforms import ImageTransform, to_float_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand `{a,b}` lists and `{000..099}` ranges (zero padding kept), left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [p for opt in options for p in expand_braces(head + opt + tail)]


def list_shards(pattern: str) -> list[str]:
    """Shard paths of a brace and/or glob pattern, in sorted order.

    Raises:
        DataError: the pattern matches no file.
    """
    paths: list[str] = []
    for expanded in expand_braces(pattern):
        if any(c in expanded for c in "*?["):
            paths.extend(sorted(glob.glob(expanded)))
        elif Path(expanded).is_file():
            paths.append(expanded)
    if not paths:
        raise DataError(f"{pattern}: no shard matches; check data.shards")
    return paths


def _split_key(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def iter_tar_groups(
    shard: str, on_problem: Callable[[DataError], None]
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream `(key, {extension: bytes})` groups from one tar shard.

    Unreadable members and truncated or corrupt archives are reported through `on_problem`
    (which raises or counts); a corrupt archive ends the shard.
    """
    key: str | None = None
    group: dict[str, bytes] = {}
    try:
        with Path(shard).open("rb") as fh:
            plain = fh.read(2) not in (b"\x1f\x8b", b"BZ", b"\xfd7")
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_key(member.name)
                if key is not None and k != key:
                    yield key, group
                    group = {}
                key = k
                try:
                    content = tar.extractfile(member)
                    group[ext] = content.read() if content is not None else b""
                except (tarfile.TarError, OSError) as exc:
                    on_problem(DataError(f"{shard}: member {member.name}: unreadable ({exc})"))
            # A plain tar ends with two zero blocks; without them the file was cut at a member
            # boundary: the members read so far are intact, so only warn.
            if plain and tar.offset + 2 * tarfile.BLOCKSIZE > Path(shard).stat().st_size:
                logger.warning("%s: no end-of-archive marker; the shard may be truncated", shard)
    except (tarfile.TarError, OSError, EOFError) as exc:
        on_problem(DataError(f"{shard}: corrupt or truncated tar ({exc}); rest of shard skipped"))
    if key is not None and group:
        yield key, group


class WebDatasetStream(IterableDataset[VisualTextSample]):
    """Image-text pairs streamed from tar shards.

    Args:
        options: the `webdataset` options.
        split: overrides `options.split` (picks train/eval behaviour when `train` is None).
        transform: uint8 `(3, H, W)` → float `(3, S, S)`; default: scale to [0, 1] only.
        tokenizer: default: the packaged CLIP tokenizer.
        max_text_len: caption tokens kept (incl. EOT).
        seed: seed of shard order, shuffle buffer, caption choice and augmentations.
        rank: this process's rank.
        world_size: number of ranks.
        train: endless shuffled stream (default: split == "train") instead of one ordered pass.
    """

    collate_fn = staticmethod(collate_visual_text)

    def __init__(
        self,
        options: WebDatasetOptions,
        *,
        split: str | None = None,
        transform: ImageTransform | None = None,
        tokenizer: TextTokenizer | None = None,
        max_text_len: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        train: bool | None = None,
    ) -> None:
        super().__init__()
        split = split or options.split
        self.options = options
        self.shards = list_shards(options.shards)
        self.transform = transform or to_float_image
        self._tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.train = split == "train" if train is None else train
        self.skipped = 0
        self.ledger = BadItemLedger(options.shards, options.max_bad_fraction)
        self._pending: list[SkippedItem] = []
        self._shard = ""
        self._key: str = ""
        self._seen = 0

    @property
    def bad_items(self) -> tuple[SkippedItem, ...]:
        """Distinct broken records met in this process."""
        return tuple(self.ledger.items.values())

    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer (the packaged CLIP tokenizer unless one was given)."""
        if self._tokenizer is None:
            self._tokenizer = default_tokenizer()
        return self._tokenizer

    def _problem(self, error: DataError) -> None:
        if self.options.on_error == "raise":
            raise error
        self.skipped += 1
        if not self._key:  # a problem outside any record (archive level) counts as one record
            self._seen += 1
        name = f"{self._shard}: {self._key}" if self._key else self._shard
        key = name if self._key else f"{self._shard}#tar"
        item = SkippedItem(source=self.options.shards, key=key, name=name, reason=str(error))
        self._pending.append(item)
        self.ledger.add(item)
        logger.warning("skipping (%d skipped so far in this process): %s", self.skipped, error)
        self.ledger.check_stream(self._seen)

    def _captions(self, shard: str, key: str, group: dict[str, bytes]) -> tuple[str, ...] | None:
        ext = self.options.caption_key
        if ext not in group:
            self._problem(DataError(f"{shard}: sample {key}: no .{ext} caption member"))
            return None
        try:
            if ext == "txt":
                caps: list[str] = [group[ext].decode("utf-8").strip()]
            else:
                meta = json.loads(group[ext].decode("utf-8"))
                several = meta.get("captions")
                value = several if isinstance(several, list) and several else meta.get("caption")
                caps = [value] if isinstance(value, str) else list(value or [])
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as exc:
            self._problem(DataError(f"{shard}: member {key}.{ext}: unreadable caption ({exc})"))
            return None
        caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
        if not caps:
            self._problem(DataError(f"{shard}: member {key}.{ext}: empty caption"))
            return None
        return tuple(caps)

    def _sample(
        self, shard: str, key: str, group: dict[str, bytes], count: int
    ) -> VisualTextSample | None:
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
        if image_ext is None:
            self._problem(DataError(f"{shard}: sample {key}: no image member ({IMAGE_EXTENSIONS})"))
            return None
        captions = self._captions(shard, key, group)
        if captions is None:
            return None
        try:
            image = decode_image_bytes(group[image_ext], f"{shard}: member {key}.{image_ext}")
        except DataError as exc:
            self._problem(exc)
            return None
        if self.train and len(captions) > 1:
            captions = (captions[int(torch.randint(len(captions), (1,)))],)
        pixels = self.transform(image)
        ids = tuple(encode_caption(self.tokenizer, c, self.max_text_len) for c in captions)
        return VisualTextSample(
            pixels=pixels, text_ids=ids, captions=captions, item_id=key, index=count
        )

    def _consumer(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[VisualTextSample]:
        consumer, consumers = self._consumer()
        by_shard = len(self.shards) >= consumers
        cap = (
            math.ceil(self.options.max_samples / consumers)
            if self.options.max_samples is not None
            else None
        )
        emitted = 0
        epoch = 0
        while True:
            rng = random.Random(mix_seed(self.seed, epoch, consumer))
            shards = list(self.shards)
            if self.train:
                random.Random(mix_seed(self.seed, epoch)).shuffle(shards)
            mine = shards[consumer::consumers] if by_shard else shards
            stream = self._samples(mine, by_shard, consumer, consumers, epoch)
            if self.train:
                stream = _shuffled(stream, self.options.shuffle_buffer, rng)
            produced = False
            for sample in stream:
                produced = True
                yield sample
                emitted += 1
                if cap is not None and emitted >= cap:
                    return
            if not self.train:
                self.ledger.check_stream(self._seen, final=True)
                return
            if not produced:
                raise DataError(f"{self.options.shards}: no usable samples for consumer {consumer}")
            epoch += 1

    def _samples(
        self, shards: list[str], by_shard: bool, consumer: int, consumers: int, epoch: int
    ) -> Iterator[VisualTextSample]:
        count = 0
        seen = 0
        for shard in shards:
            self._shard, self._key = shard, ""
            for key, group in iter_tar_groups(shard, self._problem):
                seen += 1
                if not by_shard and (seen - 1) % consumers != consumer:
                    continue
                self._seen += 1
                self._key = key
                seed = mix_seed(self.seed, 7, epoch, consumer, count) if self.train else None
                with seeded_scope(seed):
                    sample = self._sample(shard, key, group, count)
                self._key = ""
                if sample is not None:
                    count += 1
                    if self._pending:
                        sample = dataclasses.replace(sample, skipped=tuple(self._pending))
                        self._pending = []
                    yield sample


def _shuffled(
    stream: Iterator[VisualTextSample], size: int, rng: random.Random
) -> Iterator[VisualTextSample]:
    buffer: list[VisualTextSample] = []
    for sample in stream:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


#: Alias of `WebDatasetStream` (the name the training engine imports).
WebDatasetDataset = WebDatasetStream
