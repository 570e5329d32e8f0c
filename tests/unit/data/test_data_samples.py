from __future__ import annotations

import pytest
import torch

from uniperceiver_cli.data.samples import (
    ClassificationBatch,
    ClassificationSample,
    MLMSample,
    TextClassificationSample,
    VisualTextSample,
    collate,
    collate_classification,
    collate_mlm,
    collate_text_classification,
    collate_visual_text,
    pad_sequences,
)


def test_pad_sequences_values_and_mask() -> None:
    ids, pad = pad_sequences([torch.tensor([5, 6, 7]), torch.tensor([9])])
    assert ids.tolist() == [[5, 6, 7], [9, 0, 0]]
    assert pad.tolist() == [[False, False, False], [False, True, True]]
    ids, _ = pad_sequences([torch.tensor([1])], pad_value=-1)
    assert ids.tolist() == [[1]]


def test_collate_classification_images_and_views() -> None:
    imgs = [ClassificationSample(torch.full((3, 4, 4), float(i)), i % 2, i) for i in range(3)]
    b = collate(imgs)
    assert isinstance(b, ClassificationBatch)
    assert b.pixels.shape == (3, 3, 4, 4)
    assert b.labels.tolist() == [0, 1, 0]
    assert b.modality == "image" and b.num_views == 1 and b.batch_size == 3
    views = [ClassificationSample(torch.zeros(6, 2, 3, 4, 4), 1, i) for i in range(2)]
    vb = collate_classification(views)
    assert vb.pixels.shape == (2, 6, 2, 3, 4, 4)
    assert vb.modality == "video" and vb.num_views == 6


def test_collate_visual_text_flattens_captions() -> None:
    s0 = VisualTextSample(
        torch.zeros(3, 4, 4), (torch.tensor([1, 2, 49407]),), ("a b",), item_id=10, index=0
    )
    s1 = VisualTextSample(
        torch.ones(3, 4, 4),
        (torch.tensor([3, 49407]), torch.tensor([4, 5, 6, 49407])),
        ("c", "d e f"),
        item_id=11,
        index=1,
    )
    b = collate_visual_text([s0, s1])
    assert b.text_ids.shape == (3, 4)
    assert b.text_owner.tolist() == [0, 1, 1]
    assert b.captions == ("a b", "c", "d e f")
    assert b.item_ids == (10, 11)
    assert b.text_padding.sum(1).tolist() == [1, 2, 0]
    moved = b.to("cpu")
    assert torch.equal(moved.text_ids, b.text_ids) and moved.captions == b.captions


def test_collate_mlm_pads_labels_with_minus_one() -> None:
    b = collate_mlm(
        [
            MLMSample(torch.tensor([1, 2]), torch.tensor([-1, 2]), 0),
            MLMSample(torch.tensor([3]), torch.tensor([3]), 1),
        ]
    )
    assert b.labels.tolist() == [[-1, 2], [3, -1]]
    assert b.padding.tolist() == [[False, False], [False, True]]


def test_collate_text_classification() -> None:
    b = collate_text_classification(
        [TextClassificationSample(torch.tensor([1, 49410, 2]), 1, 0, 5)]
    )
    assert b.slots.tolist() == [1] and b.labels.tolist() == [0] and b.indices.tolist() == [5]


def test_collate_rejects_mixed_pixel_shapes() -> None:
    with pytest.raises(ValueError, match="one pixel shape"):
        collate(
            [
                ClassificationSample(torch.zeros(3, 4, 4), 0, 0),
                ClassificationSample(torch.zeros(3, 5, 5), 0, 1),
            ]
        )
