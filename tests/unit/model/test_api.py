"""The public API: `uniperceiver_cli.load` sources, feature methods, shape errors, temperatures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import uniperceiver_cli
from uniperceiver_cli.api import resolve_checkpoint
from uniperceiver_cli.model.checkpoint import CheckpointError, save_pretrained
from uniperceiver_cli.model.heads import SimilarityHead
from uniperceiver_cli.model.presets import get_preset
from uniperceiver_cli.model.uniperceiver import UniPerceiver


def test_load_run_folder_checkpoint_folder_and_reference(
    tiny: UniPerceiver, tmp_path: Path, official_tiny: Path
) -> None:
    run = tmp_path / "run"
    save_pretrained(tiny, run / "checkpoints" / "step-000010")
    (run / "checkpoints" / "LATEST").write_text("step-000010\n")
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-000010"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = tiny.encode_images(x)
        for source in (run, run / "checkpoints" / "step-000010"):
            model = uniperceiver_cli.load(source)
            assert not model.training
            assert torch.equal(model.encode_images(x), expected)
        ref = uniperceiver_cli.load(official_tiny / "dense" / "checkpoint_torch.pth")
    assert isinstance(ref, UniPerceiver)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file or folder"):
        uniperceiver_cli.load(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"not a run folder .*needs config\.json"):
        uniperceiver_cli.load(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "LATEST").write_text("step-9")
    with pytest.raises(CheckpointError, match="run folder is incomplete"):
        uniperceiver_cli.load(tmp_path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"\.pth"):
        uniperceiver_cli.load(other)


@torch.no_grad()
def test_features_are_normalised_and_shapes_checked(tiny: UniPerceiver) -> None:
    img = tiny.encode_images(torch.randn(3, 3, 32, 32))
    vid = tiny.encode_videos(torch.randn(2, 4, 3, 32, 32))
    assert img.shape == (3, 64) and vid.shape == (2, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tiny.encode_images(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tiny.encode_images(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"T <= 8"):
        tiny.encode_videos(torch.randn(1, 9, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, T, 3, 32, 32\)"):
        tiny.encode_videos(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        tiny.similarity(img, torch.randn(2, 32))
    with pytest.raises(ValueError, match="list of strings"):
        tiny.encode_texts("a cat")


@torch.no_grad()
def test_texts_similarity_and_caption(tiny: UniPerceiver) -> None:
    pytest.importorskip("uniperceiver_cli.data.tokenizer")
    texts = tiny.encode_texts(["a cat on a mat", "dogs"])
    assert texts.shape == (2, 64)
    img = tiny.encode_images(torch.randn(2, 3, 32, 32))
    logits = tiny.similarity(img, texts, "retrieve")
    scale = tiny.head.temperature("retrieve")
    torch.testing.assert_close(logits, scale * img @ texts.t())
    torch.testing.assert_close(tiny.similarity(img, texts, "image_retrieval"), logits)
    captions = tiny.caption(torch.randn(2, 3, 32, 32), beam_size=2, max_len=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_temperature_cap_and_names() -> None:
    head = SimilarityHead(get_preset("tiny"))
    with torch.no_grad():
        head.logit_scales["retrieve"].fill_(5.0)  # exp(5) = 148 > 100
        head.logit_scales["img_cls"].fill_(3.0)
    t = head.temperature("retrieve")
    t.backward()
    assert t.item() == 100.0
    assert head.logit_scales["retrieve"].grad is not None
    assert head.logit_scales["retrieve"].grad.item() == 0.0  # no gradient through the cap
    t2 = head.temperature("image_classification")
    t2.backward()
    assert t2.item() == pytest.approx(torch.tensor(3.0).exp().item())
    assert head.logit_scales["img_cls"].grad.item() == pytest.approx(t2.item())  # type: ignore[union-attr]
    assert head.scale_name("mlm") == "text_mlm"  # task type wins over the unused `mlm` scale
    assert head.scale_name("caption") == "caption"
    with pytest.raises(KeyError, match="unknown temperature"):
        head.temperature("nope")
