"""Parity of the builtin caption metrics with pycocoevalcap 1.2 (skipped without it or Java)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from synth_captions import coco_oracle_available, synth_set
from typer.testing import CliRunner

from uniperceiver_cli.cli.app import app
from uniperceiver_cli.metrics.caption.ngrams import bleu_scores, cider_d, rouge_l
from uniperceiver_cli.metrics.caption.ptb import tokenize_captions

needs_coco = pytest.mark.skipif(
    not coco_oracle_available(),
    reason="pycocoevalcap 1.2 and a Java runtime are needed for parity with the COCO evaluation",
)


@needs_coco
def test_tokenizer_and_ngram_metrics_match_pycocoevalcap() -> None:
    """One Java tokenizer call per side (~1 s each); BLEU/ROUGE-L/CIDEr-D scorers are Python."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    preds, refs = synth_set(60, seed=11)
    ids = list(refs)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs[k]] for k in ids})
    res = tokenizer.tokenize({k: [{"caption": preds[k]}] for k in ids})
    ours_refs_flat = tokenize_captions([c for k in ids for c in refs[k]])
    ours_refs = [ours_refs_flat[5 * i : 5 * i + 5] for i in range(len(ids))]
    ours_hyps = tokenize_captions([preds[k] for k in ids])
    assert ours_refs == [gts[k] for k in ids]
    assert ours_hyps == [res[k][0] for k in ids]

    bleu_ref, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert bleu_scores(ours_hyps, ours_refs)[0] == pytest.approx(bleu_ref, abs=1e-12)
    assert rouge_l(ours_hyps, ours_refs)[0] == pytest.approx(
        Rouge().compute_score(gts, res)[0], abs=1e-12
    )
    assert cider_d(ours_hyps, ours_refs)[0] == pytest.approx(
        Cider().compute_score(gts, res)[0], abs=1e-12
    )


@needs_coco
def test_score_captions_equals_pycocoevalcap_on_200_images(tmp_path: Path) -> None:
    """`score captions` (no Java) against pycocoevalcap's own scorers, METEOR included.

    200 synthetic images x 5 references with casing, punctuation and numbers, written as a COCO
    result file and a COCO caption annotation file. Measured: every metric equal to 1e-15.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    preds, refs = synth_set(200, seed=0)
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": k, "caption": c} for k, c in preds.items()]))
    annotations = tmp_path / "annotations.json"
    annotations.write_text(
        json.dumps(
            {
                "images": [{"id": k} for k in refs],
                "annotations": [
                    {"id": n, "image_id": k, "caption": c}
                    for n, (k, c) in enumerate((k, c) for k in refs for c in refs[k])
                ],
            }
        )
    )
    outcome = CliRunner().invoke(
        app, ["score", "captions", str(results), str(annotations), "--json"]
    )
    assert outcome.exit_code == 0, outcome.output
    ours = json.loads(outcome.stdout)

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs[k]] for k in refs})
    res = tokenizer.tokenize({k: [{"caption": preds[k]}] for k in refs})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {f"BLEU-{n + 1}": bleu[n] for n in range(4)}
    expected["METEOR"] = Meteor().compute_score(gts, res)[0]
    expected["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
