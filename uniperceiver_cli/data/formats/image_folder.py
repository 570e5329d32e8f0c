"""Image classification readers: `image_folder` (one folder per class) and `imagenet_list`."""

from __future__ import annotations

from pathlib import Path

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.base import MapDataset, read_class_names
from uniperceiver_cli.data.images import IMAGE_SUFFIXES, read_image
from uniperceiver_cli.data.options import ImageFolderOptions, ImagenetListOptions, OnError
from uniperceiver_cli.data.samples import ClassificationSample, collate_classification
from uniperceiver_cli.data.transforms import ImageTransform, to_float_image


class _ImageClassificationDataset(MapDataset[ClassificationSample]):
    """Shared item list, class names and loading of the two image classification readers."""

    collate_fn = staticmethod(collate_classification)

    def __init__(
        self,
        *,
        source: str,
        items: list[tuple[Path, int]],
        class_synonyms: list[tuple[str, ...]],
        transform: ImageTransform | None,
        on_error: OnError,
        max_samples: int | None,
        max_bad_fraction: float = 0.01,
    ) -> None:
        super().__init__(
            source=source,
            on_error=on_error,
            max_samples=max_samples,
            max_bad_fraction=max_bad_fraction,
        )
        self.items = items
        self.class_synonyms: tuple[tuple[str, ...], ...] = tuple(class_synonyms)
        self.transform = transform or to_float_image

    @property
    def class_names(self) -> tuple[str, ...]:
        """Display name of each class (first synonym), in index order."""
        return tuple(names[0] for names in self.class_synonyms)

    @property
    def labels(self) -> list[int]:
        """Class index of every item (for stratified subsets), capped like `len(self)`."""
        return [label for _, label in self.items[: len(self)]]

    def _num_items(self) -> int:
        return len(self.items)

    def item_name(self, index: int) -> str:
        """The image file of item `index`."""
        return str(self.items[index][0])

    def load(self, index: int) -> ClassificationSample:
        path, label = self.items[index]
        pixels = self.transform(read_image(path))
        return ClassificationSample(pixels=pixels, label=label, index=index)


class ImageFolderDataset(_ImageClassificationDataset):
    """Images in one sub-folder per class: `root/<split>/<class>/*` or, without split folders,
    `root/<class>/*`.

    Without `class_names_file`, the classes are the sorted sub-folder names and a class's index is
    its sorted position. With it, the file gives the classes in index order (one per line,
    synonyms `a|b`): when every folder name matches a name in the file (ignoring case, `_` vs
    space), folders are matched by name, so the file's order wins and a split may lack some
    class folders; otherwise line k names the k-th sorted folder and the counts must agree.

    Args:
        options: the `image_folder` options.
        split: overrides `options.split`.
        transform: uint8 `(3, H, W)` → float `(3, S, S)`; default: scale to [0, 1] only.
    """

    def __init__(
        self,
        options: ImageFolderOptions,
        *,
        split: str | None = None,
        transform: ImageTransform | None = None,
    ) -> None:
        split = split or options.split
        root = Path(options.root)
        if not root.is_dir():
            raise DataError(f"{root}: image folder not found; check data.root")
        base = root / split if (root / split).is_dir() else root
        folders = sorted(d for d in base.iterdir() if d.is_dir())
        if not folders:
            raise DataError(
                f"{base}: expected one sub-folder per class (or a '{split}' folder holding them), "
                "found none"
            )
        synonyms, labels = _folder_classes(folders, options.class_names_file)
        items: list[tuple[Path, int]] = []
        for label, folder in zip(labels, folders, strict=True):
            files = sorted(
                f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            items.extend((f, label) for f in files)
        if not items:
            raise DataError(f"{base}: class folders hold no image files ({sorted(IMAGE_SUFFIXES)})")
        super().__init__(
            source=str(base),
            items=items,
            class_synonyms=synonyms,
            transform=transform,
            on_error=options.on_error,
            max_samples=options.max_samples,
            max_bad_fraction=options.max_bad_fraction,
        )
        by_label = {label: f.name for label, f in zip(labels, folders, strict=True)}
        #: Folder of each class in class-index order ("" for a class without a folder here).
        self.folders = tuple(by_label.get(k, "") for k in range(len(synonyms)))


def _folder_key(name: str) -> str:
    return name.strip().replace(" ", "_").lower()


def _folder_classes(
    folders: list[Path], class_names_file: str | None
) -> tuple[list[tuple[str, ...]], list[int]]:
    """Class synonyms (index order) and the class index of each folder."""
    if not class_names_file:
        return [(f.name.replace("_", " "),) for f in folders], list(range(len(folders)))
    synonyms = read_class_names(class_names_file)
    by_key: dict[str, int] = {}
    for k, names in enumerate(synonyms):
        for name in names:
            by_key.setdefault(_folder_key(name), k)
    matched = [by_key.get(_folder_key(f.name)) for f in folders]
    if all(m is not None for m in matched):
        labels = [int(m) for m in matched if m is not None]
        if len(set(labels)) != len(labels):
            raise DataError(
                f"{class_names_file}: two class folders match the same class; give each folder "
                "its own line"
            )
        return synonyms, labels
    if len(synonyms) != len(folders):
        raise DataError(
            f"{class_names_file}: expected {len(folders)} class names (one per class folder, in "
            f"sorted folder order), found {len(synonyms)}; list one line per class, or use the "
            "folder names so that classes are matched by name"
        )
    return synonyms, list(range(len(folders)))


class ImagenetListDataset(_ImageClassificationDataset):
    """ImageNet list files (SPEC §3.2.1): `<annotations_dir>/<split>.txt` with lines
    `<relative path> <label>`; images at `<images_dir>/<split>/<relative path>`.

    Args:
        options: the `imagenet_list` options.
        split: overrides `options.split`.
        transform: uint8 `(3, H, W)` → float `(3, S, S)`; default: scale to [0, 1] only.
    """

    def __init__(
        self,
        options: ImagenetListOptions,
        *,
        split: str | None = None,
        transform: ImageTransform | None = None,
    ) -> None:
        split = split or options.split
        list_file = Path(options.annotations_dir) / f"{split}.txt"
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as exc:
            raise DataError(
                f"{list_file}: list file not found; check annotations_dir and split"
            ) from exc
        synonyms = read_class_names(options.class_names_file)
        image_root = Path(options.images_dir) / split
        items: list[tuple[Path, int]] = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(
                    f"{list_file}: line {lineno}: expected '<relative path> <label int>', "
                    f"found {line!r}"
                )
            label = int(parts[1])
            if not 0 <= label < len(synonyms):
                raise DataError(
                    f"{list_file}: line {lineno}: label {label} out of range for "
                    f"{len(synonyms)} classes in {options.class_names_file}"
                )
            items.append((image_root / parts[0], label))
        if not items:
            raise DataError(f"{list_file}: no records; expected lines '<relative path> <label>'")
        super().__init__(
            source=str(list_file),
            items=items,
            class_synonyms=synonyms,
            transform=transform,
            on_error=options.on_error,
            max_samples=options.max_samples,
            max_bad_fraction=options.max_bad_fraction,
        )
