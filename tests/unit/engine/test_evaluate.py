"""The evaluation engine: ranking, thresholds, outputs, determinism and batch-size invariance on the toy world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from uniperceiver_cli.engine.evaluate import (
    EvalError,
    EvalResult,
    FailUnder,
    Protocol,
    TaskResult,
    check_fail_under,
    checkpoint_sha256,
    evaluate_tasks,
    failed_thresholds,
    parse_fail_under,
    rank_retrieval,
    tasks_from_recipe,
    vocabulary_features_cached,
    write_outputs,
)
from uniperceiver_cli.engine.presets import preset_recipe
from uniperceiver_cli.model.build import build_model
from uniperceiver_cli.model.presets import get_preset
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.recipe.schema import ROOTS


def random_model(seed: int = 0) -> UniPerceiver:
    """A tiny model whose features differ between inputs (layer scales 0.5, noisy biases)."""
    torch.manual_seed(seed)
    model = build_model(get_preset("tiny", num_heads=2))
    with torch.no_grad():
        for layer in model.encoder.blocks():
            layer.gamma_1.fill_(0.5)
            layer.gamma_2.fill_(0.5)
            for linear in (layer.qkv, layer.attn_out, layer.ffn_in, layer.ffn_out):
                linear.bias.normal_(0.0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> UniPerceiver:
    return random_model()


def toy_task(
    name: str, task_type: str, num_samples: int, *, frames: int = 0, **fields: object
) -> dict[str, object]:
    """A recipe task on `num_samples` items of the toy world's val split, in batches of 8.

    Args:
        name: task name.
        task_type: recipe task type.
        num_samples: size of the split.
        frames: frames per video (task and data), 0 for image tasks.
        **fields: further task settings, e.g. `max_text_len`.
    """
    data: dict[str, object] = {"format": "toy", "split": "val", "num_samples": num_samples}
    task: dict[str, object] = {"name": name, "type": task_type, "batch_size": 8, **fields}
    if frames:
        task["num_frames"] = data["num_frames"] = frames
    return {**task, "data": data}


def toy_recipe(task: dict[str, object], **evaluation: object) -> object:
    raw = {
        "command": "eval",
        "run": {"name": "t"},
        "tasks": [task],
        "evaluation": {"batch_size": 16, **evaluation},
    }
    return ROOTS["eval"].model_validate(raw)


# ---------------------------------------------------------------------------------------------- ranking


def test_rank_retrieval_hand_computed() -> None:
    # 3 items, 4 captions: captions 0,1 belong to item 0, caption 2 to item 1, caption 3 to item 2.
    visual = torch.eye(3, 4)
    texts = torch.tensor(
        [
            [0.0, 1.0, 0.0, 0.0],  # caption 0 (item 0) looks like item 1
            [0.9, 0.0, 0.1, 0.0],  # caption 1 (item 0) matches item 0 best
            [0.0, 0.2, 0.98, 0.0],  # caption 2 (item 1) looks like item 2
            [0.0, 0.0, 0.0, 1.0],  # caption 3 (item 2) matches nothing: all zeros against items
        ]
    )
    owner = torch.tensor([0, 0, 1, 2])
    metrics, ranks = rank_retrieval(visual, texts, owner)
    # sim = visual @ texts.T (3 x 4):
    # item 0: [0, .9, 0, 0] -> best caption 1 (own) rank 0
    # item 1: [1, 0, .2, 0] -> caption 0, then caption 2 (own) rank 1
    # item 2: [0, .1, .98, 0] -> caption 2, caption 1, then captions 0, 3 tie (index order) -> own rank 3
    assert ranks["i2t_rank"] == [0, 1, 3]
    assert ranks["i2t_top"][1][:2] == [0, 2]
    assert metrics["r1_i2t"] == pytest.approx(1 / 3)
    assert metrics["r5_i2t"] == pytest.approx(1.0)
    # t2i, column-wise: caption 0 -> item 1 first (own item 0 has 0, ties with item 2 -> index order: item 0
    # before item 2) => rank 1; caption 1 -> item 0 rank 0; caption 2 -> item 2 (.98) then item 1 (.2): rank 1;
    # caption 3 -> all zero: items 0, 1, 2 tie -> own item 2 rank 2.
    assert ranks["t2i_rank"] == [1, 0, 1, 2]
    assert metrics["r1_t2i"] == pytest.approx(0.25)
    assert metrics["r5_t2i"] == pytest.approx(1.0)
    six = [metrics[f"r{k}_{d}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert metrics["rsum"] == pytest.approx(sum(six))
    assert metrics["r_mean"] == pytest.approx(sum(six) / 6)


# ---------------------------------------------------------------------------------------------- thresholds


def test_parse_fail_under() -> None:
    assert parse_fail_under(["r1_i2t=0.5", "toy/acc1 = 0.25"]) == [
        FailUnder("r1_i2t", 0.5),
        FailUnder("toy/acc1", 0.25),
    ]
    for bad in ("r1_i2t", "=0.5", "r1_i2t=high"):
        with pytest.raises(EvalError, match="METRIC=VALUE"):
            parse_fail_under([bad])


def _result(metrics: dict[str, dict[str, float]]) -> EvalResult:
    tasks = {
        name: TaskResult(name=name, type="image_retrieval", metrics=m, num_items=1)
        for name, m in metrics.items()
    }
    return EvalResult(tasks, {"run": "x"})


def test_fail_under_bare_and_qualified_names() -> None:
    result = _result({"a": {"r1_i2t": 0.4, "rsum": 2.0}, "b": {"r1_i2t": 0.8}})
    assert result["a/r1_i2t"] == 0.4 and result["b/r1_i2t"] == 0.8
    failures = failed_thresholds(result, parse_fail_under(["r1_i2t=0.5"]))
    assert [f["metric"] for f in failures] == ["a/r1_i2t"]
    assert failed_thresholds(result, parse_fail_under(["b/r1_i2t=0.5"])) == []
    failures = failed_thresholds(result, parse_fail_under(["b/r1_i2t=0.9", "rsum=1.5"]))
    assert [(f["metric"], f["threshold"]) for f in failures] == [("b/r1_i2t", 0.9)]
    with pytest.raises(EvalError, match="no evaluated task reports this metric"):
        failed_thresholds(result, parse_fail_under(["acc1=0.1"]))
    with pytest.raises(EvalError, match="known metrics: r1_i2t"):
        check_fail_under([FailUnder("b/rsum", 1.0)], {"a": ["r1_i2t", "rsum"], "b": ["r1_i2t"]})


# ---------------------------------------------------------------------------------------------- tasks


def test_training_recipe_evaluates_only_tasks_with_eval_data(model: UniPerceiver) -> None:
    raw = {
        "command": "pretrain",
        "run": {"name": "t"},
        "schedule": {"max_steps": 10},
        "tasks": [
            {
                "name": "with_eval",
                "type": "image_retrieval",
                "batch_size": 4,
                "data": {"format": "toy", "split": "train", "num_samples": 8},
                "eval_data": {"format": "toy", "split": "val", "num_samples": 6},
            },
            {
                "name": "no_eval",
                "type": "image_classification",
                "batch_size": 4,
                "data": {"format": "toy", "num_samples": 8},
            },
        ],
    }
    recipe = ROOTS["pretrain"].model_validate(raw)
    tasks = tasks_from_recipe(recipe, model_image_size=32)
    assert [t.name for t in tasks] == ["with_eval"]
    assert tasks[0].split == "val" and len(tasks[0].data.dataset) == 6  # type: ignore[arg-type]
    # the training loop calls `evaluate_tasks(model, recipe)` and logs the plain dict it returns
    result = evaluate_tasks(model, recipe)
    assert type(result).__mro__[1] is dict
    assert sorted(result) == sorted(f"with_eval/{m}" for m in result.tasks["with_eval"].metrics)
    assert result.tasks["with_eval"].num_items == 6


def test_vqa_is_reported_as_unsupported() -> None:
    from uniperceiver_cli.engine.data import TaskDataError

    recipe = toy_recipe(
        {"name": "q", "type": "vqa", "batch_size": 4, "data": {"format": "toy", "num_samples": 4}}
    )
    with pytest.raises(TaskDataError, match="VQA evaluation needs a VQA reader"):
        tasks_from_recipe(recipe, model_image_size=32)


# ---------------------------------------------------------------------------------------------- determinism


def test_retrieval_identical_across_runs_and_batch_sizes(model: UniPerceiver) -> None:
    base = evaluate_tasks(model, preset_recipe("toy-retrieval", batch_size=64))
    again = evaluate_tasks(model, preset_recipe("toy-retrieval", batch_size=64))
    small = evaluate_tasks(model, preset_recipe("toy-retrieval", batch_size=7))
    assert dict(base) == dict(again)
    assert dict(base) == dict(small)
    res = base.tasks["toy_retrieve"]
    assert res.num_items == 128 and res.num_texts is not None and res.num_texts > 128
    assert res.ranks is not None and len(res.ranks["i2t_top"]) == 128
    # the random model is not at ceiling, and the metrics are fractions
    assert 0.0 <= base["toy_retrieve/r1_i2t"] < 0.5
    assert base["toy_retrieve/r10_t2i"] >= base["toy_retrieve/r1_t2i"]


def test_classification_and_cloze_identical_across_batch_sizes(model: UniPerceiver) -> None:
    cls = toy_task("cls", "image_classification", 40)
    cloze = toy_task("pairs", "text_classification", 40, max_text_len=32)
    raw = {"command": "eval", "run": {"name": "t"}, "tasks": [cls, cloze]}
    big = evaluate_tasks(
        model, ROOTS["eval"].model_validate({**raw, "evaluation": {"batch_size": 40}})
    )
    small = evaluate_tasks(
        model, ROOTS["eval"].model_validate({**raw, "evaluation": {"batch_size": 3}})
    )
    assert dict(big) == dict(small)
    assert set(big.tasks["cls"].metrics) == {"acc1", "acc5"}
    assert set(big.tasks["pairs"].metrics) == {"accuracy"}
    preds = big.tasks["pairs"].predictions
    assert preds is not None and len(preds) == 40
    acc = sum(p["prediction"] == p["label"] for p in preds) / 40
    assert big["pairs/accuracy"] == pytest.approx(acc)


def test_video_views_average_softmax(model: UniPerceiver) -> None:
    task = toy_task("motion", "video_classification", 12, frames=4)
    one = evaluate_tasks(model, toy_recipe(task))
    three = evaluate_tasks(model, toy_recipe(task, temporal_views=3))
    # toy views are identical clips: the mean of equal softmaxes ranks like the single view
    assert one["motion/acc1"] == three["motion/acc1"]
    assert three.tasks["motion"].protocol["views"] == 3
    assert "acc5" not in three.tasks["motion"].metrics  # 4 motion classes only


# ---------------------------------------------------------------------------------------------- captions


def test_caption_predictions_vocab_cache_and_outputs(model: UniPerceiver, tmp_path: Path) -> None:
    from uniperceiver_cli.model.checkpoint import save_pretrained

    ckpt = save_pretrained(model, tmp_path / "ckpt")
    task = toy_task("cap", "image_caption", 6, max_text_len=16)
    recipe = toy_recipe(task, beam_size=2, max_len=5)
    cache = tmp_path / "cache"
    first = evaluate_tasks(
        model, recipe, checkpoint=ckpt, vocab_cache_dir=cache, output_dir=tmp_path / "out"
    )
    assert first.metadata["vocabulary"]["source"] == "encoded"
    assert len(list((cache / "vocab").glob("*.safetensors"))) == 1
    second = evaluate_tasks(model, toy_recipe(task, beam_size=2, max_len=5, batch_size=4),
                            checkpoint=ckpt, vocab_cache_dir=cache)  # fmt: skip
    assert second.metadata["vocabulary"]["source"] == "disk"
    assert first.tasks["cap"].predictions == second.tasks["cap"].predictions
    assert dict(first) == dict(second)
    preds = json.loads((tmp_path / "out" / "cap.captions.json").read_text())
    assert [p["image_id"] for p in preds] == list(range(6))
    assert all(isinstance(p["caption"], str) for p in preds)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["checkpoint"]["sha256"] == checkpoint_sha256(ckpt)
    assert metrics["tasks"]["cap"]["protocol"]["beam_size"] == 2
    assert metrics["tasks"]["cap"]["implementation"]["metrics"] == "builtin"
    assert set(metrics["metrics"]["cap"]) == {
        "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider",
    }  # fmt: skip


def test_vocabulary_cache_rejects_wrong_shape(model: UniPerceiver, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    fp = "ab" * 32
    with torch.no_grad():
        feats, source = vocabulary_features_cached(model, fingerprint=fp, cache_dir=tmp_path)
    assert source == "encoded" and feats.shape == (49411, 64)
    (path,) = (tmp_path / "vocab").glob("*.safetensors")
    save_file({"features": torch.zeros(3, 64)}, str(path))
    with torch.no_grad():
        _, source = vocabulary_features_cached(model, fingerprint=fp, cache_dir=tmp_path)
    assert source == "encoded"


def test_eval_restores_training_mode_and_write_outputs(model: UniPerceiver, tmp_path: Path) -> None:
    model.train()
    try:
        result = evaluate_tasks(model, preset_recipe("toy-classification", batch_size=64))
        assert model.training
    finally:
        model.eval()
    files = write_outputs(result, tmp_path)
    assert sorted(f.name for f in files) == ["metrics.json", "toy_cls.predictions.json"]
    payload = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["metrics"]["toy_cls"]["acc1"] == result["toy_cls/acc1"]
    assert payload["tasks"]["toy_cls"]["split"] == "val"


def test_protocol_from_recipe_section() -> None:
    recipe = preset_recipe("kinetics-400")
    proto = Protocol.from_spec(recipe.evaluation)
    assert (proto.temporal_views, proto.spatial_crops, proto.view_mode) == (4, 3, "interleaved")
    assert proto.describe("video_classification")["views"] == 12
    assert Protocol.from_spec(recipe.evaluation, batch_size=2).batch_size == 2


def test_checkpoint_sha256_of_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "a.pth").write_bytes(b"weights")
    import hashlib

    assert checkpoint_sha256(tmp_path / "a.pth") == hashlib.sha256(b"weights").hexdigest()
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x")
    first = checkpoint_sha256(folder)
    (folder / "model.safetensors").write_bytes(b"y")
    assert checkpoint_sha256(folder) != first
    with pytest.raises(EvalError, match="expected a checkpoint"):
        checkpoint_sha256(tmp_path / "missing")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(model: UniPerceiver) -> None:
    cpu = evaluate_tasks(model, preset_recipe("toy-retrieval"))
    try:
        gpu = evaluate_tasks(model, preset_recipe("toy-retrieval"), device="cuda")
    finally:
        model.to("cpu")
    assert gpu.metadata["device"].startswith("cuda")
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, abs=0.02)


def test_multiview_video_files_average_softmax_over_views(
    model: UniPerceiver, tmp_path: Path
) -> None:
    from uniperceiver_cli.data.toy_files import encode_mp4
    from uniperceiver_cli.metrics.classification import multiview_probabilities

    gen = torch.Generator().manual_seed(0)
    rows = ["path,label"]
    for i in range(4):
        frames = torch.randint(0, 256, (12, 3, 32, 48), dtype=torch.uint8, generator=gen)
        encode_mp4(frames, tmp_path / f"v{i}.mp4", 10.0)
        rows.append(f"v{i}.mp4,{['left', 'right'][i % 2]}")
    (tmp_path / "ann.csv").write_text("\n".join(rows) + "\n")
    task = {
        "name": "clips",
        "type": "video_classification",
        "batch_size": 3,
        "num_frames": 4,
        "data": {
            "format": "video_classification",
            "annotation_file": str(tmp_path / "ann.csv"),
            "videos_dir": str(tmp_path),
            "decoder": "pyav",
        },
    }
    recipe = toy_recipe(task, temporal_views=2, spatial_crops=3, view_mode="interleaved")
    (evaluated,) = tasks_from_recipe(recipe, model_image_size=32)
    sample = evaluated.data.dataset[0]  # type: ignore[index]
    assert sample.pixels.shape == (6, 4, 3, 32, 32)  # 2 temporal x 3 spatial views
    assert not torch.equal(sample.pixels[0], sample.pixels[1])  # the crops differ
    result = evaluate_tasks(model, recipe)
    assert result.tasks["clips"].protocol["views"] == 6
    # the same prediction by hand: softmax per view, mean over the 6 views
    with torch.no_grad():
        names = model.encode_texts(["left", "right"])
        probs = []
        for i in range(4):
            pixels = evaluated.data.dataset[i].pixels  # type: ignore[index]
            feats = model.visual_features(pixels, task_type="video_classification").features
            logits = model.head.logits(feats, names, "video_cls", normalized=False)
            probs.append(multiview_probabilities(logits.unsqueeze(0)))
    pred = torch.cat(probs).argmax(dim=1)
    expected = float((pred == torch.tensor([0, 1, 0, 1])).float().mean())
    assert result["clips/acc1"] == pytest.approx(expected)
    preds = result.tasks["clips"].predictions
    assert preds is not None and [p["top5"][0] for p in preds] == pred.tolist()
