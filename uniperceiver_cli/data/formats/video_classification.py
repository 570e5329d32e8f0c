"""`video_classification` reader: CSV `path,label` or the Kinetics layout (SPEC §3.2.8)."""

from __future__ import annotations

import csv
from pathlib import Path

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.base import MapDataset, read_class_names, read_json
from uniperceiver_cli.data.options import VideoClassificationOptions
from uniperceiver_cli.data.samples import ClassificationSample, collate_classification
from uniperceiver_cli.data.transforms import VideoTransform, to_float_image
from uniperceiver_cli.data.video import ClipSpec, open_video, read_clip, resolve_backend

#: Kinetics `subset` value of each split name.
KINETICS_SUBSETS = {"train": "training", "val": "validation", "test": "testing"}


def _read_category_mapping(path: Path) -> list[str]:
    """`category_mapping.txt`: lines `<class name>\\t<idx>` → names in index order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: category mapping not found; check class_names_file") from exc
    by_index: dict[int, str] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        name, sep, idx = line.rpartition("\t")
        if not sep or not idx.strip().isdigit():
            raise DataError(
                f"{path}: line {lineno}: expected '<class name>\\t<index>', found {line!r}"
            )
        by_index[int(idx)] = name.strip()
    if sorted(by_index) != list(range(len(by_index))):
        raise DataError(f"{path}: class indices must be 0..{len(by_index) - 1} without gaps")
    return [by_index[i] for i in range(len(by_index))]


def _label_index(key: str) -> str:
    """Normalise a class label for matching (case, `_` vs space)."""
    return key.strip().replace("_", " ").lower()


class VideoClassificationDataset(MapDataset[ClassificationSample]):
    """Labelled videos → `ClassificationSample`s with clips `(T, 3, S, S)` (train) or views.

    CSV layout: rows `path,label` (optional `path,label` header); `path` relative to
    `videos_dir`; `label` a class name (matched ignoring case and `_`/space) or a class index.
    Kinetics layout: `annotation.json` entries whose `subset` matches the split (`train` →
    `training`, `val` → `validation`, `test` → `testing`), videos at
    `<videos_dir>/<subset>/<label>/<name><extension>`.

    Args:
        options: the `video_classification` options.
        split: overrides `options.split`.
        transform: uint8 `(T, 3, H, W)` → float clip (or crops); default: scale to [0, 1] only.
        clip: frames, stride and evaluation views.
        train: random clips (default: split == "train") instead of evaluation views.
    """

    collate_fn = staticmethod(collate_classification)

    def __init__(
        self,
        options: VideoClassificationOptions,
        *,
        split: str | None = None,
        transform: VideoTransform | None = None,
        clip: ClipSpec | None = None,
        train: bool | None = None,
    ) -> None:
        split = split or options.split
        ann = Path(options.annotation_file)
        super().__init__(
            source=str(ann),
            on_error=options.on_error,
            max_samples=options.max_samples,
            max_bad_fraction=options.max_bad_fraction,
        )
        self.clip = clip or ClipSpec()
        self.train = split == "train" if train is None else train
        self.transform = transform or to_float_image
        self.backend = resolve_backend(options.decoder)
        root = Path(options.videos_dir)
        if options.layout == "kinetics":
            raw_items, synonyms = self._kinetics(options, ann, root, split)
        else:
            raw_items, synonyms = self._csv(options, ann, root)
        self.class_synonyms: tuple[tuple[str, ...], ...] = tuple(synonyms)
        self.items = raw_items
        if not self.items:
            raise DataError(f"{ann}: no videos for split {split!r}")

    @staticmethod
    def _names(options: VideoClassificationOptions, labels: list[str]) -> list[tuple[str, ...]]:
        if options.class_names_file:
            path = Path(options.class_names_file)
            if _looks_tabbed(path):
                return [(n,) for n in _read_category_mapping(path)]
            return read_class_names(path)
        return [(n.replace("_", " "),) for n in sorted(set(labels))]

    def _csv(
        self, options: VideoClassificationOptions, ann: Path, root: Path
    ) -> tuple[list[tuple[Path, int]], list[tuple[str, ...]]]:
        try:
            with ann.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
        except FileNotFoundError as exc:
            raise DataError(f"{ann}: annotation CSV not found; check annotation_file") from exc
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
            rows = rows[1:]
        parsed: list[tuple[int, str, str]] = []
        for i, row in enumerate(rows):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) < 2:
                raise DataError(f"{ann}: record {i}: expected 'path,label', found {row!r}")
            parsed.append((i, row[0].strip(), row[1].strip()))
        names = self._names(options, [lab for _, _, lab in parsed if not lab.isdigit()])
        lookup = {_label_index(s): k for k, syn in enumerate(names) for s in syn}
        items: list[tuple[Path, int]] = []
        for i, rel, lab in parsed:
            if lab.isdigit():
                label = int(lab)
                if not options.class_names_file:
                    raise DataError(
                        f"{ann}: record {i}: numeric label {lab} needs class_names_file "
                        "to name the classes"
                    )
            elif _label_index(lab) in lookup:
                label = lookup[_label_index(lab)]
            else:
                raise DataError(f"{ann}: record {i}: unknown class {lab!r}")
            if not 0 <= label < len(names):
                raise DataError(
                    f"{ann}: record {i}: label {label} out of range for {len(names)} classes"
                )
            items.append((root / rel, label))
        return items, names

    def _kinetics(
        self, options: VideoClassificationOptions, ann: Path, root: Path, split: str
    ) -> tuple[list[tuple[Path, int]], list[tuple[str, ...]]]:
        data = read_json(ann, "Kinetics annotation file")
        if not isinstance(data, dict) or not isinstance(data.get("database"), dict):
            raise DataError(
                f"{ann}: expected an object with a 'database' mapping (Kinetics layout)"
            )
        subset = KINETICS_SUBSETS.get(split, split)
        chosen: list[tuple[str, str]] = []
        for i, (name, rec) in enumerate(data["database"].items()):
            if not isinstance(rec, dict) or "subset" not in rec:
                raise DataError(f"{ann}: record {i} ({name}): missing 'subset'")
            if rec["subset"] != subset:
                continue
            label = (
                rec.get("annotations", {}).get("label")
                if isinstance(rec.get("annotations"), dict)
                else None
            )
            if not isinstance(label, str):
                raise DataError(f"{ann}: record {i} ({name}): missing 'annotations.label'")
            chosen.append((name, label))
        names = self._names(options, [lab for _, lab in chosen])
        lookup = {_label_index(s): k for k, syn in enumerate(names) for s in syn}
        items: list[tuple[Path, int]] = []
        for name, label in chosen:
            if _label_index(label) not in lookup:
                raise DataError(f"{ann}: entry {name}: label {label!r} not among the class names")
            path = root / subset / label.replace(" ", "_") / f"{name}{options.extension}"
            items.append((path, lookup[_label_index(label)]))
        return items, names

    @property
    def class_names(self) -> tuple[str, ...]:
        """Display name of each class, in index order."""
        return tuple(s[0] for s in self.class_synonyms)

    @property
    def labels(self) -> list[int]:
        """Class index of every item (for stratified subsets)."""
        return [label for _, label in self.items[: len(self)]]

    def _num_items(self) -> int:
        return len(self.items)

    def item_name(self, index: int) -> str:
        """The video file (or frame folder) of item `index`."""
        return str(self.items[index][0])

    def load(self, index: int) -> ClassificationSample:
        path, label = self.items[index]
        source = open_video(path, self.backend)
        try:
            pixels = read_clip(source, self.clip, train=self.train, transform=self.transform)
        finally:
            source.close()
        return ClassificationSample(pixels=pixels, label=label, index=index)


def _looks_tabbed(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as fh:
            first = fh.readline()
    except OSError:
        return False
    return "\t" in first and first.rstrip().rpartition("\t")[2].strip().isdigit()
