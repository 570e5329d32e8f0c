from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from data_media import write_png

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.image_folder import ImageFolderDataset, ImagenetListDataset
from uniperceiver_cli.data.options import ImageFolderOptions, ImagenetListOptions


def _folder(tmp_path: Path, split: bool) -> Path:
    root = tmp_path / "imgs"
    base = root / "train" if split else root
    write_png(base / "tabby_cat" / "a.png", (200, 0, 0))
    write_png(base / "tabby_cat" / "b.png", (201, 0, 0))
    write_png(base / "dog" / "c.png", (0, 0, 200))
    (base / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("split_folders", [True, False])
def test_image_folder_classes_and_pixels(tmp_path: Path, split_folders: bool) -> None:
    ds = ImageFolderDataset(ImageFolderOptions(root=str(_folder(tmp_path, split_folders))))
    assert len(ds) == 3
    assert ds.class_names == ("dog", "tabby cat")  # sorted folders, `_` → space
    s = ds[0]
    assert s.label == 0 and s.pixels.shape == (3, 12, 16)
    assert torch.allclose(s.pixels[:, 0, 0], torch.tensor([0.0, 0.0, 200 / 255]))
    assert [ds[i].label for i in range(3)] == [0, 1, 1] == ds.labels


def test_image_folder_class_names_file_with_synonyms(tmp_path: Path) -> None:
    root = _folder(tmp_path, True)
    names = tmp_path / "names.txt"
    names.write_text("dog|puppy\n\ncat|kitty\n")
    ds = ImageFolderDataset(ImageFolderOptions(root=str(root), class_names_file=str(names)))
    assert ds.class_names == ("dog", "cat")
    assert ds.class_synonyms == (("dog", "puppy"), ("cat", "kitty"))
    names.write_text("dog\n")
    with pytest.raises(DataError, match=r"names.txt: expected 2 class names"):
        ImageFolderDataset(ImageFolderOptions(root=str(root), class_names_file=str(names)))


def test_corrupt_image_raises_or_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _folder(tmp_path, False)
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    ds = ImageFolderDataset(ImageFolderOptions(root=str(root)))
    idx = next(i for i, (p, _) in enumerate(ds.items) if p.name == "broken.png")
    with pytest.raises(DataError, match=r"broken\.png: cannot decode image"):
        ds[idx]
    skipping = ImageFolderDataset(
        ImageFolderOptions(root=str(root), on_error="skip", max_bad_fraction=0.5)
    )
    with caplog.at_level(logging.WARNING):
        sample = skipping[idx]
    assert sample.index == (idx + 1) % len(skipping)
    assert skipping.skipped == 1 and "broken.png" in caplog.text
    assert [s.name for s in sample.skipped] == [str(bad)]
    # 1 broken of 4 is 25%, above the default limit of 1%: the run stops, naming the file.
    strict = ImageFolderDataset(ImageFolderOptions(root=str(root), on_error="skip"))
    with pytest.raises(DataError, match=r"1 of 4 items are broken .*broken\.png"):
        strict[idx]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image folder not found"):
        ImageFolderDataset(ImageFolderOptions(root=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="one sub-folder per class"):
        ImageFolderDataset(ImageFolderOptions(root=str(tmp_path / "empty")))


def _imagenet(tmp_path: Path, lines: str) -> ImagenetListOptions:
    ann = tmp_path / "ann"
    ann.mkdir(exist_ok=True)
    (ann / "val.txt").write_text(lines)
    write_png(tmp_path / "img" / "val" / "x" / "a.png", (1, 2, 3))
    write_png(tmp_path / "img" / "val" / "b.png", (4, 5, 6))
    names = tmp_path / "classes.txt"
    names.write_text("goldfish\nshark|great white shark\n")
    return ImagenetListOptions(
        annotations_dir=str(ann),
        images_dir=str(tmp_path / "img"),
        class_names_file=str(names),
        split="val",
    )


def test_imagenet_list_reads_paths_and_labels(tmp_path: Path) -> None:
    ds = ImagenetListDataset(_imagenet(tmp_path, "x/a.png 1\nb.png 0\n"))
    assert [ds[i].label for i in range(2)] == [1, 0]
    assert torch.allclose(ds[1].pixels[:, 0, 0] * 255, torch.tensor([4.0, 5.0, 6.0]))
    assert ds.class_names == ("goldfish", "shark")


def test_imagenet_list_bad_records(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"val.txt: line 2: expected '<relative path> <label int>'"):
        ImagenetListDataset(_imagenet(tmp_path, "x/a.png 1\nb.png\n"))
    with pytest.raises(DataError, match=r"val.txt: line 1: label 7 out of range for 2 classes"):
        ImagenetListDataset(_imagenet(tmp_path, "x/a.png 7\n"))
    ds = ImagenetListDataset(_imagenet(tmp_path, "missing.png 0\n"))
    with pytest.raises(DataError, match=r"missing.png: image file not found"):
        ds[0]


def test_image_folder_class_names_file_matched_by_folder_name(tmp_path: Path) -> None:
    root = _folder(tmp_path, True)
    names = tmp_path / "names.txt"
    # The file's order is the class order; folders are matched by name (`_` = space).
    names.write_text("tabby cat|kitty\ndog\nhorse\n")
    ds = ImageFolderDataset(ImageFolderOptions(root=str(root), class_names_file=str(names)))
    assert ds.class_names == ("tabby cat", "dog", "horse")
    assert ds.folders == ("tabby_cat", "dog", "")  # no horse images in this split
    assert [(p.name, label) for p, label in ds.items] == [("c.png", 1), ("a.png", 0), ("b.png", 0)]
    assert torch.allclose(ds[0].pixels[:, 0, 0], torch.tensor([0.0, 0.0, 200 / 255]))
    names.write_text("dog\ndog puppy|tabby cat\n")
    assert ImageFolderDataset(
        ImageFolderOptions(root=str(root), class_names_file=str(names))
    ).labels == [0, 1, 1]
