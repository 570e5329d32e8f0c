"""METEOR parity with meteor-1.5.jar as pycocoevalcap 1.2 runs it (skipped without it or Java).

Quick test: the jar restricted to ``-m 'exact stem synonym'`` against our exact/stem/synonym
matcher on 200 synthetic images. Second test: the full default modules (paraphrase included)
through pycocoevalcap's own ``Meteor`` on 200 other images, corpus and every caption equal to
float rounding. (`test_caption_parity.py` checks the same through ``score captions``.)
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
from synth_captions import coco_oracle_available, synth_set

from uniperceiver_cli.metrics.caption.meteor import load_meteor_resources, meteor
from uniperceiver_cli.metrics.caption.ptb import tokenize_captions

needs_coco = pytest.mark.skipif(
    not coco_oracle_available(),
    reason="pycocoevalcap 1.2 and a Java runtime are needed to run METEOR 1.5",
)


def _corpus(n_images: int, seed: int) -> tuple[list[str], list[list[str]]]:
    preds, refs = synth_set(n_images, seed=seed)
    ids = list(refs)
    hyps = tokenize_captions([preds[k] for k in ids])
    flat = tokenize_captions([c for k in ids for c in refs[k]])
    return hyps, [flat[5 * i : 5 * i + 5] for i in range(len(ids))]


def _jar_scores(hyps: list[str], refs: list[list[str]], modules: str) -> tuple[float, list[float]]:
    """SCORE/EVAL through the jar's stdio mode, as pycocoevalcap does, with a module list."""
    resources = load_meteor_resources()
    assert resources.paraphrase_file is not None
    folder = resources.paraphrase_file.parent.parent
    command = ["java", "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en"]
    command += ["-norm", "-m", modules]
    lines = []
    for hyp, ref_list in zip(hyps, refs, strict=True):
        lines.append("SCORE ||| " + " ||| ".join(ref_list) + " ||| " + hyp.replace("|||", ""))
    with subprocess.Popen(
        command, cwd=Path(folder), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        stats = []
        for line in lines:
            proc.stdin.write(line.replace("  ", " ") + "\n")
            proc.stdin.flush()
            stats.append(proc.stdout.readline().strip())
        proc.stdin.write("EVAL ||| " + " ||| ".join(stats) + "\n")
        proc.stdin.flush()
        segments = [float(proc.stdout.readline()) for _ in stats]
        corpus = float(proc.stdout.readline())
        proc.stdin.close()
        proc.wait(timeout=30)
    return corpus, segments


@needs_coco
def test_exact_stem_synonym_equal_the_jar_on_200_images() -> None:
    hyps, refs = _corpus(200, seed=3)
    jar_corpus, jar_segments = _jar_scores(hyps, refs, "exact stem synonym")
    resources = dataclasses.replace(load_meteor_resources(), paraphrase_file=None)
    corpus, segments = meteor(hyps, refs, resources)
    assert corpus == pytest.approx(jar_corpus, abs=1e-12)
    assert max(abs(a - b) for a, b in zip(segments, jar_segments, strict=True)) < 1e-12


@needs_coco
def test_full_meteor_equals_pycocoevalcap_on_200_images() -> None:
    """Measured: corpus and every caption equal to 1.2e-16."""
    from pycocoevalcap.meteor.meteor import Meteor

    hyps, refs = _corpus(200, seed=7)
    gts = {i: refs[i] for i in range(len(hyps))}
    res = {i: [hyps[i]] for i in range(len(hyps))}
    coco_corpus, coco_segments = Meteor().compute_score(gts, res)
    corpus, segments = meteor(hyps, refs)
    assert corpus == pytest.approx(coco_corpus, abs=1e-12)
    assert max(abs(a - b) for a, b in zip(segments, coco_segments, strict=True)) < 1e-12
