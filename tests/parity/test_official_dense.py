"""Parity with the official dense Uni-Perceiver on the golden `official_tiny` fixtures (fp32, CPU).

Every dense output of `dense/outputs.safetensors` is recomputed from `dense/checkpoint_torch.pth` and the inputs of
`inputs.safetensors` / `inputs.json` (MANIFEST.md §5 explains each tensor).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from uniperceiver_cli.model.checkpoint import load_reference_checkpoint
from uniperceiver_cli.model.decode import caption_search
from uniperceiver_cli.model.heads import l2_normalize
from uniperceiver_cli.model.uniperceiver import UniPerceiver

pytestmark = pytest.mark.parity

FEAT_TOL = 1e-5
LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def fx(official_tiny: Path) -> dict[str, Any]:
    model, report = load_reference_checkpoint(official_tiny / "dense" / "checkpoint_torch.pth")
    return {
        "model": model,
        "report": report,
        "out": load_file(str(official_tiny / "dense" / "outputs.safetensors")),
        "inp": load_file(str(official_tiny / "inputs.safetensors")),
        "json": json.loads((official_tiny / "inputs.json").read_text()),
    }


@pytest.fixture(scope="module")
def vocab(fx: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        feats: torch.Tensor = fx["model"].vocabulary_features()
    return feats


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol:g}"


def test_import_report(fx: dict[str, Any]) -> None:
    report = fx["report"]
    assert report.layout == "torch" and report.naming == "dense"
    assert report.missing == []
    assert not report.folded_type_embedding  # the released dense file is already folded
    assert set(report.ignored) == {
        "video_embed.embeddings_type.weight",
        "video_embed.embeddings_norm.weight",
        "video_embed.embeddings_norm.bias",
    }
    assert len(report.mapped) == 52
    cfg = fx["model"].config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.ffn_size) == (64, 2, 1, 256)
    assert (cfg.image_size, cfg.patch_size, cfg.max_frames) == (32, 16, 8)
    assert abs(cfg.pos_embed_scale - 160 / 224) < 1e-12


@torch.no_grad()
def test_image_and_class_features(fx: dict[str, Any]) -> None:
    m: UniPerceiver = fx["model"]
    inp, out = fx["inp"], fx["out"]
    img = m.visual_features(inp["images"], task_type="image_classification")
    close(img.hidden[:, 0], out["image.spe_hidden"], FEAT_TOL)
    close(img.features, out["image.feat_proj"], FEAT_TOL)
    close(l2_normalize(img.features), out["image.feat_norm"], FEAT_TOL)
    cls = m.target_features(inp["imagenet_target_tokens"], inp["imagenet_target_invalid_mask"])
    close(cls.hidden[:, 0], out["imagenet_classes.spe_hidden"], FEAT_TOL)
    close(cls.features, out["imagenet_classes.feat_proj"], FEAT_TOL)
    close(l2_normalize(cls.features), out["imagenet_classes.feat_norm"], FEAT_TOL)
    scores = m.classification_logits(
        inp["images"], inp["imagenet_target_tokens"], inp["imagenet_target_invalid_mask"]
    )
    close(scores.logits, out["image_cls.logits"], LOGIT_TOL)


@torch.no_grad()
def test_video_features_and_classification(fx: dict[str, Any]) -> None:
    m: UniPerceiver = fx["model"]
    inp, out = fx["inp"], fx["out"]
    vid = m.visual_features(inp["videos"], task_type="video_classification")
    close(vid.hidden[:, 0], out["video.spe_hidden"], FEAT_TOL)
    close(vid.features, out["video.feat_proj"], FEAT_TOL)
    close(l2_normalize(vid.features), out["video.feat_norm"], FEAT_TOL)
    k400 = m.target_features(inp["k400_target_tokens"], inp["k400_target_invalid_mask"])
    close(k400.hidden[:, 0], out["k400_classes.spe_hidden"], FEAT_TOL)
    close(k400.features, out["k400_classes.feat_proj"], FEAT_TOL)
    close(l2_normalize(k400.features), out["k400_classes.feat_norm"], FEAT_TOL)
    scores = m.classification_logits(
        inp["videos"],
        inp["k400_target_tokens"],
        inp["k400_target_invalid_mask"],
        task_type="video_classification",
    )
    close(scores.logits, out["video_cls.logits"], LOGIT_TOL)


@torch.no_grad()
def test_retrieval(fx: dict[str, Any]) -> None:
    m: UniPerceiver = fx["model"]
    inp, out = fx["inp"], fx["out"]
    img = l2_normalize(m.visual_features(inp["images"], task_type="image_retrieval").features)
    close(img, out["retrieval.image_feat_norm"], FEAT_TOL)
    cap = m.target_features(
        inp["image_captions_tokens"], inp["image_captions_invalid_mask"], kind="captions"
    )
    close(cap.hidden[:, 0], out["caption.spe_hidden"], FEAT_TOL)
    close(cap.features, out["caption.feat_proj"], FEAT_TOL)
    cap_n = l2_normalize(cap.features)
    close(cap_n, out["caption.feat_norm"], FEAT_TOL)
    close(cap_n, out["retrieval.caption_feat_norm"], FEAT_TOL)
    close(img @ cap_n.t(), out["retrieval.sim_i2t"], FEAT_TOL)
    first = m.target_features(
        inp["image_first_caption_tokens"], inp["image_first_caption_invalid_mask"], kind="captions"
    )
    img_z = m.visual_features(inp["images"], task_type="image_retrieval").features
    i2t, t2i = m.retrieval_logits(img_z, first.features)
    close(i2t, out["retrieval.logits_i2t"], LOGIT_TOL)
    close(t2i, out["retrieval.logits_t2i"], LOGIT_TOL)
    # the cap: exp(5.01) = 150 > 100, so the temperature is exactly 100
    assert m.head.temperature("retrieve").item() == 100.0


@torch.no_grad()
def test_video_retrieval(fx: dict[str, Any]) -> None:
    m: UniPerceiver = fx["model"]
    inp, out = fx["inp"], fx["out"]
    vid = l2_normalize(m.visual_features(inp["videos"], task_type="video_retrieval").features)
    close(vid, out["video_retrieval.video_feat_norm"], FEAT_TOL)
    cap = m.target_features(
        inp["video_captions_tokens"], inp["video_captions_invalid_mask"], kind="captions"
    )
    close(cap.features, out["video_retrieval.caption_feat_proj"], FEAT_TOL)
    cap_n = l2_normalize(cap.features)
    close(cap_n, out["video_retrieval.caption_feat_norm"], FEAT_TOL)
    close(vid @ cap_n.t(), out["video_retrieval.sim_v2t"], FEAT_TOL)


@torch.no_grad()
def test_vocabulary_subset(fx: dict[str, Any], vocab: torch.Tensor) -> None:
    m: UniPerceiver = fx["model"]
    out = fx["out"]
    ids = out["vocab.subset_ids"]
    close(vocab[ids], out["vocab.feat_proj_subset"], FEAT_TOL)
    close(m.vocabulary_features(ids), out["vocab.feat_proj_subset"], FEAT_TOL)
    assert vocab.shape == (49411, 64)


@torch.no_grad()
def test_caption_teacher_forcing(fx: dict[str, Any], vocab: torch.Tensor) -> None:
    m: UniPerceiver = fx["model"]
    inp, out = fx["inp"], fx["out"]
    n = inp["caption_tf_targets"].shape[1]
    words = inp["caption_tf_text_tokens"][:, :n]
    assert torch.equal(words, inp["caption_tf_targets"])
    index = fx["json"]["caption_tf_image_index"]
    scores = m.caption_logits(inp["images"][index : index + 1], words, None, vocab)
    close(scores.features[0], out["caption_tf.query_feat_proj"], FEAT_TOL)
    close(scores.logits[0], out["caption_tf.logits"], LOGIT_TOL)


@torch.no_grad()
def test_mlm(fx: dict[str, Any], vocab: torch.Tensor) -> None:
    m: UniPerceiver = fx["model"]
    inp, out = fx["inp"], fx["out"]
    masked = inp["mlm_labels"] != -1
    scores = m.mlm_logits(inp["mlm_input_tokens"], inp["mlm_input_invalid_mask"], masked, vocab)
    assert torch.equal(inp["mlm_labels"][masked], out["mlm.targets"])
    close(scores.features, out["mlm.query_feat_proj"], FEAT_TOL)
    close(scores.logits, out["mlm.logits"], LOGIT_TOL)


@pytest.mark.parametrize(
    ("name", "source", "beam", "penalty"),
    [
        ("decode_greedy", "images", 1, 0.0),
        ("decode_beam2", "images", 2, 2.0),
        ("decode_video_beam2", "videos", 2, 2.0),
    ],
)
@torch.no_grad()
def test_decoding(
    fx: dict[str, Any], vocab: torch.Tensor, name: str, source: str, beam: int, penalty: float
) -> None:
    m: UniPerceiver = fx["model"]
    out = fx["out"]
    result = caption_search(
        m,
        fx["inp"][source],
        beam_size=beam,
        max_len=10,
        length_penalty=penalty,
        vocab_features=vocab,
        task_type="video_caption" if source == "videos" else "image_caption",
    )
    assert torch.equal(result.ids, out[f"{name}.ids"])
    close(result.logp, out[f"{name}.logp"], LOGIT_TOL)
    if beam > 1:
        assert torch.equal(result.all_ids, out[f"{name}.all_beams_ids"])
        close(result.all_logp, out[f"{name}.all_beams_logp"], LOGIT_TOL)


@torch.no_grad()
def test_layer_inputs(fx: dict[str, Any]) -> None:
    m: UniPerceiver = fx["model"]
    inp, out = fx["inp"], fx["out"]
    img = m.encode(task_type="image_classification", visual=inp["images"], return_layer_inputs=True)
    assert img.layer_inputs is not None
    close(torch.stack(img.layer_inputs), out["debug.image_layer_inputs"], FEAT_TOL)
    cap = m.encode(
        task_type="captions",
        text_ids=inp["image_captions_tokens"],
        text_padding=inp["image_captions_invalid_mask"],
        target_kind="captions",
        return_layer_inputs=True,
    )
    assert cap.layer_inputs is not None
    got = torch.stack(cap.layer_inputs)  # (L+1, N, 1+Lt, D)
    valid = torch.cat(
        [torch.ones(6, 1, dtype=torch.bool), inp["image_captions_invalid_mask"] == 0], dim=1
    )
    expected = out["debug.caption_layer_inputs"]
    close(got[:, valid], expected[:, valid], FEAT_TOL)


@torch.no_grad()
def test_public_api(official_tiny: Path, fx: dict[str, Any]) -> None:
    import uniperceiver_cli

    pytest.importorskip("uniperceiver_cli.data.tokenizer")
    model = uniperceiver_cli.load(official_tiny / "dense" / "checkpoint_torch.pth")
    inp, out, js = fx["inp"], fx["out"], fx["json"]
    close(model.encode_images(inp["images"]), out["image.feat_norm"], FEAT_TOL)
    close(model.encode_videos(inp["videos"]), out["video.feat_norm"], FEAT_TOL)
    close(
        model.encode_texts(js["imagenet_class_names"]), out["imagenet_classes.feat_norm"], FEAT_TOL
    )
    close(model.encode_texts(js["k400_class_names"]), out["k400_classes.feat_norm"], FEAT_TOL)
    # retrieval captions that the fixture did not truncate (the last one was cut to 30 tokens)
    caps = [c for pair in js["image_captions"] for c in pair][:5]
    close(model.encode_texts(caps), out["caption.feat_norm"][:5], FEAT_TOL)
    video_caps = [c for pair in js["video_captions"] for c in pair]
    close(model.encode_texts(video_caps), out["video_retrieval.caption_feat_norm"], FEAT_TOL)
    logits = model.similarity(
        model.encode_images(inp["images"]),
        model.encode_texts(js["imagenet_class_names"]),
        "img_cls",
    )
    close(logits, out["image_cls.logits"], LOGIT_TOL)
