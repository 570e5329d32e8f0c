"""What the dense and the MoE parity suites share: tolerances, the loaded fixture, the checks.

`ParitySuite` holds every check that both released model families pass on the golden
`official_tiny` fixtures (MANIFEST.md §5, §6). `test_official_dense.py` and `test_official_moe.py`
subclass it next to a module-scoped `fx` fixture (a `Golden`) and add their format-specific tests.
The `vocab` fixture lives in this folder's `conftest.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import uniperceiver_cli
from uniperceiver_cli.model.checkpoint import ImportReport, load_reference_checkpoint
from uniperceiver_cli.model.decode import caption_search
from uniperceiver_cli.model.heads import l2_normalize
from uniperceiver_cli.model.uniperceiver import ModelOutput, UniPerceiver

FEAT_TOL = 1e-5
LOGIT_TOL = 1e-4


@dataclass(frozen=True)
class Golden:
    """One released checkpoint, imported, with the fixture inputs and the outputs it must reproduce.

    Attributes:
        checkpoint: the checkpoint file.
        model: the imported model (eval mode, fp32, CPU).
        report: what the import did.
        inp: `inputs.safetensors` (shared by every checkpoint).
        out: `<family>/outputs.safetensors` of the reference.
        inputs_json: `inputs.json` (class names, captions, indices).
        outputs_json: `<family>/outputs.json`.
    """

    checkpoint: Path
    model: UniPerceiver
    report: ImportReport
    inp: dict[str, torch.Tensor]
    out: dict[str, torch.Tensor]
    inputs_json: dict[str, Any]
    outputs_json: dict[str, Any]


def load_golden(official_tiny: Path, checkpoint: Path, family: str) -> Golden:
    """Import `official_tiny / checkpoint` and read the fixture files of its model family.

    Args:
        official_tiny: the fixture folder.
        checkpoint: checkpoint path relative to it.
        family: `dense` or `moe`, the folder holding the reference outputs.

    Returns:
        The loaded fixture.
    """
    path = official_tiny / checkpoint
    model, report = load_reference_checkpoint(path)
    return Golden(
        checkpoint=path,
        model=model,
        report=report,
        inp=load_file(str(official_tiny / "inputs.safetensors")),
        out=load_file(str(official_tiny / family / "outputs.safetensors")),
        inputs_json=json.loads((official_tiny / "inputs.json").read_text()),
        outputs_json=json.loads((official_tiny / family / "outputs.json").read_text()),
    )


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Assert equal shapes and a max absolute difference of at most `tol`."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol:g}"


def check_features(encoded: ModelOutput, g: Golden, key: str) -> torch.Tensor:
    """Compare an encoding with `<key>.spe_hidden`, `<key>.feat_proj` and `<key>.feat_norm`.

    Args:
        encoded: the model output; `hidden` (N, L, D), `features` (N, D).
        g: the fixture.
        key: the output group, e.g. `image` or `imagenet_classes`.

    Returns:
        The L2-normalised features (N, D).
    """
    close(encoded.hidden[:, 0], g.out[f"{key}.spe_hidden"], FEAT_TOL)
    close(encoded.features, g.out[f"{key}.feat_proj"], FEAT_TOL)
    normed = l2_normalize(encoded.features)
    close(normed, g.out[f"{key}.feat_norm"], FEAT_TOL)
    return normed


class ParitySuite:
    """The checks both model families pass; subclass it next to a module-scoped `fx: Golden`."""

    @pytest.mark.parametrize(("visual", "classes"), [("image", "imagenet"), ("video", "k400")])
    @torch.no_grad()
    def test_classification(self, fx: Golden, visual: str, classes: str) -> None:
        """`<visual>s` against the `<classes>` class names: both encodings and the logits."""
        m, inp, out = fx.model, fx.inp, fx.out
        pixels, task_type = inp[f"{visual}s"], f"{visual}_classification"
        check_features(m.visual_features(pixels, task_type=task_type), fx, visual)
        tokens, padding = inp[f"{classes}_target_tokens"], inp[f"{classes}_target_invalid_mask"]
        check_features(m.target_features(tokens, padding), fx, f"{classes}_classes")
        scores = m.classification_logits(pixels, tokens, padding, task_type=task_type)
        close(scores.logits, out[f"{visual}_cls.logits"], LOGIT_TOL)

    @torch.no_grad()
    def test_retrieval(self, fx: Golden) -> None:
        m, inp, out = fx.model, fx.inp, fx.out
        img = l2_normalize(m.visual_features(inp["images"], task_type="image_retrieval").features)
        close(img, out["retrieval.image_feat_norm"], FEAT_TOL)
        cap = m.target_features(
            inp["image_captions_tokens"], inp["image_captions_invalid_mask"], kind="captions"
        )
        cap_n = check_features(cap, fx, "caption")
        close(cap_n, out["retrieval.caption_feat_norm"], FEAT_TOL)
        close(img @ cap_n.t(), out["retrieval.sim_i2t"], FEAT_TOL)
        first = m.target_features(
            inp["image_first_caption_tokens"],
            inp["image_first_caption_invalid_mask"],
            kind="captions",
        )
        img_z = m.visual_features(inp["images"], task_type="image_retrieval").features
        i2t, t2i = m.retrieval_logits(img_z, first.features)
        close(i2t, out["retrieval.logits_i2t"], LOGIT_TOL)
        close(t2i, out["retrieval.logits_t2i"], LOGIT_TOL)
        # the cap: exp(5.01) = 150 > 100, so the temperature is exactly 100
        assert m.head.temperature("retrieve").item() == 100.0

    @torch.no_grad()
    def test_video_retrieval(self, fx: Golden) -> None:
        m, inp, out = fx.model, fx.inp, fx.out
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
    def test_vocabulary_subset(self, fx: Golden, vocab: torch.Tensor) -> None:
        ids = fx.out["vocab.subset_ids"]
        close(vocab[ids], fx.out["vocab.feat_proj_subset"], FEAT_TOL)
        close(fx.model.vocabulary_features(ids), fx.out["vocab.feat_proj_subset"], FEAT_TOL)
        assert vocab.shape == (49411, 64)

    @torch.no_grad()
    def test_caption_teacher_forcing(self, fx: Golden, vocab: torch.Tensor) -> None:
        m, inp, out = fx.model, fx.inp, fx.out
        n = inp["caption_tf_targets"].shape[1]
        words = inp["caption_tf_text_tokens"][:, :n]
        assert torch.equal(words, inp["caption_tf_targets"])
        assert torch.equal(words[0], out["caption_tf.targets"])
        index = fx.inputs_json["caption_tf_image_index"]
        scores = m.caption_logits(inp["images"][index : index + 1], words, None, vocab)
        close(scores.features[0], out["caption_tf.query_feat_proj"], FEAT_TOL)
        close(scores.logits[0], out["caption_tf.logits"], LOGIT_TOL)

    @torch.no_grad()
    def test_mlm(self, fx: Golden, vocab: torch.Tensor) -> None:
        m, inp, out = fx.model, fx.inp, fx.out
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
        self, fx: Golden, vocab: torch.Tensor, name: str, source: str, beam: int, penalty: float
    ) -> None:
        out = fx.out
        result = caption_search(
            fx.model,
            fx.inp[source],
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
    def test_layer_inputs(self, fx: Golden) -> None:
        m, inp, out = fx.model, fx.inp, fx.out
        img = m.encode(
            task_type="image_classification", visual=inp["images"], return_layer_inputs=True
        )
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
        close(got[:, valid], out["debug.caption_layer_inputs"][:, valid], FEAT_TOL)

    @torch.no_grad()
    def test_public_api(self, fx: Golden) -> None:
        pytest.importorskip("uniperceiver_cli.data.tokenizer")
        model = uniperceiver_cli.load(fx.checkpoint)
        inp, out, js = fx.inp, fx.out, fx.inputs_json
        close(model.encode_images(inp["images"]), out["image.feat_norm"], FEAT_TOL)
        close(model.encode_videos(inp["videos"]), out["video.feat_norm"], FEAT_TOL)
        for names, key in (("imagenet_class_names", "imagenet"), ("k400_class_names", "k400")):
            close(model.encode_texts(js[names]), out[f"{key}_classes.feat_norm"], FEAT_TOL)
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
