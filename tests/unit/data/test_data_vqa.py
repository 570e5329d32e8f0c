"""VQA: the JSON-lines reader, the toy world's questions, the answer target set and batches."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from data_media import write_png

from uniperceiver_cli.data.build import build_dataset, build_loader, data_fraction_subset
from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.vqa import (
    VQADataset,
    parse_vqa_jsonl,
    read_answers_file,
    swap_left_right,
)
from uniperceiver_cli.data.options import JsonlPairsOptions, ToyOptions
from uniperceiver_cli.data.sampler import SampleKey
from uniperceiver_cli.data.samples import VQABatch
from uniperceiver_cli.data.targets import answer_targets
from uniperceiver_cli.data.tokenizer import ClipTokenizer
from uniperceiver_cli.data.toy import COLOURS, POSITIONS, SHAPES, SIZES, ToyWorld

SPE, EOT = 49410, 49407


def _vqa_file(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    write_png(tmp_path / "img" / "a.png", (200, 0, 0), size=(8, 12))
    write_png(tmp_path / "img" / "b.png", (0, 0, 200), size=(8, 12))
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS: list[dict[str, Any]] = [
    {"question_id": 10, "image": "a.png", "question": "what colour is the box on the left?",
     "answers": ["red", "red", "red", "dark red", "left"]},
    {"question_id": 11, "image": "b.png", "question": "is it blue?",
     "answers": ["yes", "no"], "scores": [0.9, 0.3]},
    {"image": "b.png", "question": "how many boxes?", "answers": "one"},
]  # fmt: skip


def test_parse_scores_and_vocabulary(tmp_path: Path, tok: ClipTokenizer) -> None:
    file = _vqa_file(tmp_path, RECORDS)
    opts = JsonlPairsOptions(file=str(file), images_dir=str(tmp_path / "img"), split="val")
    records = parse_vqa_jsonl(opts)
    assert [r.item_id for r in records] == [10, 11, 2]
    # Without scores: min(1, count / 3) per distinct answer.
    assert records[0].answers == ("red", "dark red", "left")
    assert records[0].scores == pytest.approx((1.0, 1 / 3, 1 / 3))
    assert records[1].scores == (0.9, 0.3) and records[2].answers == ("one",)
    ds = VQADataset(opts, tokenizer=tok)
    # Default vocabulary: distinct answers, most frequent first, ties alphabetical.
    assert ds.answers == ("dark red", "left", "no", "one", "red", "yes")
    assert ds.labels == [4, 5, 3]
    s = ds[0]
    assert s.ids.tolist() == [*tok.encode("what colour is the box on the left?"), SPE, EOT]
    assert s.slot == len(s.ids) - 2 and s.ids[s.slot] == SPE
    assert s.answer_labels == (4, 0, 1) and s.target == 4  # eval target: best-scored answer
    assert s.pixels.shape == (3, 8, 12) and s.item_id == 10
    assert ds.targets()[1] == {"yes": 0.9, "no": 0.3}
    # An explicit vocabulary (e.g. the training one) fixes the indices; unknown answers get -1.
    answers = tmp_path / "answers.txt"
    answers.write_text("yes\nno\nred\n")
    fixed = VQADataset(
        JsonlPairsOptions(
            file=str(file), images_dir=str(tmp_path / "img"), answers_file=str(answers)
        ),
        tokenizer=tok,
        train=False,
    )
    assert fixed.answers == ("yes", "no", "red")
    assert fixed[0].answer_labels == (2, -1, -1) and fixed[2].target == -1


def test_malformed_vqa_records_name_file_record_and_field(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"image": "a.png", "answers": ["x"]}, r"vqa\.jsonl: record 0: missing 'question'"),
        ({"image": "a.png", "question": "q?", "answers": [1]},
         r"record 0: 'answers' must be a string or a list of strings"),
        ({"image": "a.png", "question": "q?", "answers": ["x", "y"], "scores": [1.0]},
         r"record 0: expected one score per answer, found 2 answers and 1 scores"),
        ({"image": "a.png", "question": "q?", "answers": ["x"], "scores": [1.5]},
         r"record 0: score of answer 'x' must be a number in \[0, 1\], found 1\.5"),
        ({"image": "", "question": "q?", "answers": ["x"]}, r"record 0: 'image' must be"),
    ]  # fmt: skip
    for record, message in cases:
        file = _vqa_file(tmp_path, [record])
        with pytest.raises(DataError, match=message):
            parse_vqa_jsonl(JsonlPairsOptions(file=str(file)))
    dup = tmp_path / "answers.txt"
    dup.write_text("yes\nno\nyes\n")
    with pytest.raises(DataError, match=r"answers\.txt: line 3: answer 'yes' already on line 1"):
        read_answers_file(dup)


def test_training_flip_swaps_left_and_right_and_targets_follow_scores(
    tmp_path: Path, tok: ClipTokenizer
) -> None:
    assert swap_left_right("Left of the right box, leftover") == "Right of the left box, leftover"
    file = _vqa_file(tmp_path, RECORDS)
    ds = VQADataset(
        JsonlPairsOptions(file=str(file), images_dir=str(tmp_path / "img")), tokenizer=tok
    )
    assert ds.train
    flipped = plain = None
    for seed in range(40):
        s = ds[SampleKey(0, seed)]
        if "right" in s.question:
            flipped = s
        else:
            plain = s
    assert flipped is not None and plain is not None
    assert flipped.question == "what colour is the box on the right?"
    assert flipped.answers == ("red", "dark red", "right")
    assert flipped.answer_labels[2] == -1  # "right" is not in this file's vocabulary
    assert torch.equal(flipped.pixels, torch.flip(plain.pixels, dims=(-1,)))
    assert torch.equal(ds[SampleKey(0, 3)].pixels, ds[SampleKey(0, 3)].pixels)  # seeded
    # Training targets are drawn in proportion to the scores: yes 0.9 vs no 0.3 -> 3:1.
    draws = Counter(ds.answers[ds[SampleKey(1, seed)].target] for seed in range(400))
    assert 0.68 < draws["yes"] / 400 < 0.82, draws


def test_toy_vqa_questions_are_answered_by_the_image() -> None:
    world = ToyWorld(2)
    kinds: Counter[str] = Counter()
    for i in range(120):
        q = world.vqa(i, "train")
        scene = world.image_scene(i, "train")
        kinds[q.kind] += 1
        answer = q.answers[0]
        assert answer in world.vqa_answers and q.scores == (1.0,)
        expected = {
            "shape": scene.shape,
            "colour": scene.colour,
            "size": scene.size,
            "where": scene.position,
        }
        if q.kind in expected:
            assert answer == expected[q.kind], (q, scene)
        elif q.kind == "exists":
            asked = q.question.split()[3]
            assert (answer == "yes") == (asked == scene.colour), (q, scene)
        else:
            side = q.question.rstrip("?").split()[-1]
            assert (answer == "yes") == (scene.position == side), (q, scene)
    assert set(kinds) == {"shape", "colour", "size", "where", "exists", "side"}
    assert set(world.vqa_answers) == {*SHAPES, *COLOURS, *SIZES, *POSITIONS, "yes", "no"}
    assert world.vqa(3, "val") == ToyWorld(2).vqa(3, "val")


def test_build_dataset_vqa_batches_and_answer_targets(tmp_path: Path, tok: ClipTokenizer) -> None:
    toy: Any = build_dataset(
        ToyOptions(num_samples=24, image_size=16),
        task_type="vqa",
        image_size=16,
        tokenizer=tok,
        max_text_len=12,
    )
    batch = next(iter(build_loader(toy, batch_size=6, train=True, seed=1)))
    assert isinstance(batch, VQABatch)
    assert batch.pixels.shape == (6, 3, 16, 16) and batch.ids.shape[1] <= 12
    assert (batch.ids[torch.arange(6), batch.slots] == SPE).all()
    assert (batch.targets >= 0).all() and batch.answer_labels.shape == (6, 1)
    dense = batch.soft_scores(len(toy.answers))
    assert dense.shape == (6, len(toy.answers))
    assert dense[torch.arange(6), batch.targets].tolist() == [1.0] * 6
    targets = answer_targets(toy.answers, tokenizer=tok)
    assert targets.name == "VQA_Answer" and targets.kind == "labels"
    assert len(targets) == len(toy.answers)
    lengths = (~targets.padding).sum(1)
    assert (targets.ids[torch.arange(len(targets)), lengths - 1] == EOT).all()
    with pytest.raises(ValueError, match="unique"):
        answer_targets(["yes", "no", "yes"], tokenizer=tok)
    # A stratified few-shot subset per answer, and the JSON-lines reader behind build_dataset.
    sub = data_fraction_subset(toy, 0.1, seed=0)
    assert set(Counter(toy.labels[i] for i in sub.indices)) == set(toy.labels)
    file = _vqa_file(tmp_path, RECORDS)
    real: Any = build_dataset(
        JsonlPairsOptions(file=str(file), images_dir=str(tmp_path / "img"), split="val"),
        task_type="vqa",
        image_size=16,
        tokenizer=tok,
    )
    assert isinstance(real, VQADataset) and not real.train
    rb = next(iter(build_loader(real, batch_size=3, train=False)))
    assert rb.pixels.shape == (3, 3, 16, 16) and rb.questions[2] == "how many boxes?"
    assert rb.answer_labels.tolist()[0] == [4, 0, 1]
    assert rb.answer_scores[1, :2].tolist() == pytest.approx([0.9, 0.3])
    metrics = pytest.importorskip("uniperceiver_cli.metrics.vqa")
    best = [real.answers[int(t)] for t in rb.targets]
    # "one" was given by 1 annotator of 3: score 1/3.
    assert metrics.vqa_soft_accuracy(best, real.targets()) == pytest.approx(
        100 * (1 + 0.9 + 1 / 3) / 3
    )
