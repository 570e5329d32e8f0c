"""Ad-hoc inference on files: zero-shot classify, caption and retrieve for images and videos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from uniperceiver_cli.data.toy import ToyWorld
from uniperceiver_cli.data.toy_files import encode_mp4
from uniperceiver_cli.engine.inference import (
    InferenceError,
    caption_files,
    classify_files,
    list_media,
    load_media,
    read_queries,
    retrieve_files,
)
from uniperceiver_cli.model.build import build_model
from uniperceiver_cli.model.presets import get_preset
from uniperceiver_cli.model.uniperceiver import UniPerceiver


@pytest.fixture(scope="module")
def model() -> UniPerceiver:
    torch.manual_seed(3)
    m = build_model(get_preset("tiny", num_heads=2))
    with torch.no_grad():
        for layer in m.encoder.blocks():
            layer.gamma_1.fill_(0.5)
            layer.gamma_2.fill_(0.5)
    return m.eval()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    world = ToyWorld(0, image_size=40)
    for i in range(3):
        image, _ = world.image(i, "val")
        write_png(image, str(root / f"img{i}.png"))
    frames, _ = world.video(0, "val", num_frames=10)
    encode_mp4(frames, root / "clip.mp4", 10.0)
    folder = root / "frames"
    folder.mkdir()
    for t in range(5):
        write_png(frames[t], str(folder / f"{t:03d}.png"))
    (root / "notes.txt").write_text("not media")
    return root


def test_list_media_and_load(media: Path) -> None:
    files = list_media(media)
    assert [f.name for f in files] == ["clip.mp4", "frames", "img0.png", "img1.png", "img2.png"]
    items = load_media(files, image_size=32, frames=4, pipeline="caption")
    kinds = [m.kind for m in items]
    assert kinds == ["video", "video", "image", "image", "image"]
    assert items[0].pixels.shape == (4, 3, 32, 32)
    assert items[1].pixels.shape == (4, 3, 32, 32)
    assert items[2].pixels.shape == (3, 32, 32)
    with pytest.raises(InferenceError, match="not an image or video"):
        load_media([media / "notes.txt"], image_size=32, frames=4, pipeline="caption")
    with pytest.raises(InferenceError, match="no such file"):
        load_media([media / "missing.png"], image_size=32, frames=4, pipeline="caption")


def test_classify_probabilities_and_template(model: UniPerceiver, media: Path) -> None:
    files = [media / "img0.png", media / "clip.mp4"]
    labels = ["circle", "square", "triangle"]
    records = classify_files(model, files, labels, top_k=2, frames=4)
    assert [r["kind"] for r in records] == ["image", "video"]
    for rec in records:
        assert rec["label"] == rec["top"][0]["label"]
        assert len(rec["top"]) == 2
        assert rec["top"][0]["score"] >= rec["top"][1]["score"]
        assert 0.0 < rec["score"] <= 1.0
    # the probabilities over all labels sum to one
    full = classify_files(model, files[:1], labels, top_k=3)
    assert sum(t["score"] for t in full[0]["top"]) == pytest.approx(1.0, abs=1e-5)
    templated = classify_files(model, files[:1], labels, template="a photo of a {}.", top_k=3)
    assert [t["score"] for t in templated[0]["top"]] != [t["score"] for t in full[0]["top"]]
    with pytest.raises(InferenceError, match="must contain"):
        classify_files(model, files, labels, template="a photo")
    with pytest.raises(InferenceError, match="twice"):
        classify_files(model, files, ["a", "a"])


def test_caption_matches_model_caption(model: UniPerceiver, media: Path) -> None:
    records = caption_files(model, [media / "img1.png", media / "frames"], max_len=4, frames=4)
    assert [r["kind"] for r in records] == ["image", "video"]
    items = load_media([media / "img1.png"], image_size=32, frames=4, pipeline="caption")
    expected = model.caption(items[0].pixels.unsqueeze(0), beam_size=2, max_len=4)
    assert records[0]["caption"] == expected[0].strip()


def test_retrieve_ranks_by_cosine(model: UniPerceiver, media: Path, tmp_path: Path) -> None:
    queries_file = tmp_path / "q.txt"
    queries_file.write_text("a red circle\n\nsomething moving\n")
    queries = read_queries(queries_file)
    assert queries == ["a red circle", "something moving"]
    files = list_media(media)
    records = retrieve_files(model, files, queries, top_k=3, frames=4)
    assert [r["query"] for r in records] == queries
    items = load_media(files, image_size=32, frames=4, pipeline="caption")
    with torch.no_grad():
        text = model.encode_texts(queries[:1])[0]
        expected = {
            str(m.path): float(
                text
                @ (
                    model.encode_images(m.pixels.unsqueeze(0))
                    if m.kind == "image"
                    else model.encode_videos(m.pixels.unsqueeze(0))
                )[0]
            )
            for m in items
        }
    best = sorted(expected.items(), key=lambda kv: -kv[1])[:3]
    got = [(r["file"], r["score"]) for r in records[0]["results"]]
    assert [f for f, _ in got] == [f for f, _ in best]
    assert [s for _, s in got] == pytest.approx([s for _, s in best], abs=1e-5)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(InferenceError, match="no queries"):
        read_queries(empty)
