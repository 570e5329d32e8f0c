from __future__ import annotations

from pathlib import Path

import pytest
import torch

from uniperceiver_cli.data.targets import (
    TargetSetCache,
    caption_targets,
    class_name_targets,
    class_name_targets_from_file,
    label_word_targets,
    restricted_vocabulary_targets,
    sampled_vocabulary_targets,
    vocabulary_targets,
)
from uniperceiver_cli.data.text import EOT_ID, VOCAB_SIZE
from uniperceiver_cli.data.tokenizer import ClipTokenizer


def test_class_names_encode_name_plus_eot(tok: ClipTokenizer) -> None:
    t = class_name_targets("Toy", ["circle", "tabby cat"], tokenizer=tok)
    first = t.first()
    assert first.ids.shape == (2, len(tok.encode("tabby cat")) + 1)
    assert first.ids[0, : len(tok.encode("circle")) + 1].tolist() == [*tok.encode("circle"), EOT_ID]
    assert first.padding[0].tolist() == [False] * (len(tok.encode("circle")) + 1) + [True] * (
        first.ids.shape[1] - len(tok.encode("circle")) - 1
    )
    assert first.kind == "classes" and first.name == "Toy"


def test_synonyms_and_templates_are_variants(tok: ClipTokenizer) -> None:
    t = class_name_targets(
        "X", [("dog", "puppy", "hound"), "cat"], tokenizer=tok, templates=("{}", "a photo of a {}")
    )
    assert t.owner.tolist() == [0] * 6 + [1] * 2
    assert t.texts[:2] == ("dog", "a photo of a dog")
    g = torch.Generator().manual_seed(0)
    draws = [t.draw(g) for _ in range(60)]
    drawn = {tuple(d.ids[0][~d.padding[0]].tolist()) for d in draws}
    assert len(drawn) == 6  # every variant of class 0 is drawn
    assert all(t.draw(g).ids.shape[0] == 2 for _ in range(3))
    assert t.first().ids[1, : len(tok.encode("cat")) + 1].tolist() == [*tok.encode("cat"), EOT_ID]
    variants, owner = t.variants()
    assert len(variants) == 8 and owner.tolist() == t.owner.tolist()


def test_class_names_from_file(tmp_path: Path, tok: ClipTokenizer) -> None:
    f = tmp_path / "names.txt"
    f.write_text("goldfish|carassius auratus\nshark\n")
    t = class_name_targets_from_file("IN", f, tokenizer=tok)
    assert t.num_classes == 2 and t.texts == ("goldfish", "carassius auratus", "shark")


def test_vocabulary_and_restricted_vocabulary(tok: ClipTokenizer) -> None:
    v = vocabulary_targets()
    assert v.ids.shape == (VOCAB_SIZE, 2) and not v.padding.any()
    assert v.ids[123].tolist() == [123, EOT_ID] and v.ids[-1].tolist() == [VOCAB_SIZE - 1, EOT_ID]
    r = restricted_vocabulary_targets(["red circle", "blue"], tokenizer=tok)
    expected = sorted({*tok.encode("red circle"), *tok.encode("blue"), EOT_ID})
    assert r.token_ids is not None and r.token_ids.tolist() == expected
    assert r.ids[:, 0].tolist() == expected and (r.ids[:, 1] == EOT_ID).all()


def test_shard_pads_with_entry_zero() -> None:
    v = vocabulary_targets(vocab_size=10)
    shards = [v.shard(r, 4) for r in range(4)]
    assert [len(s) for s in shards] == [3, 3, 3, 3] and [s.num_valid for s in shards] == [
        3,
        3,
        3,
        1,
    ]
    assert shards[3].ids[:, 0].tolist() == [9, 0, 0]
    gathered = torch.cat([s.ids for s in shards])[:10]
    assert torch.equal(gathered, v.ids)


def test_captions_and_label_words(tok: ClipTokenizer) -> None:
    c = caption_targets(["a red circle", "a photo of a big blue square"], tokenizer=tok, max_len=4)
    assert c.ids.shape == (2, 4) and (c.ids[:, -1] == EOT_ID).all() and c.kind == "captions"
    lw = label_word_targets(["no", "maybe", "yes"], tokenizer=tok)
    assert lw.ids.shape == (3, 2) and lw.kind == "labels"
    assert lw.trimmed().ids.shape == (3, 2)


def test_cache_memory_and_disk(tmp_path: Path, tok: ClipTokenizer) -> None:
    calls = []
    cache = TargetSetCache(tmp_path / "cache")

    def build():  # type: ignore[no-untyped-def]
        calls.append(1)
        return class_name_targets("A", ["x", ("y", "z")], tokenizer=tok)

    key = TargetSetCache.key({"name": "A", "classes": ["x", ["y", "z"]]}, tok)
    a = cache.get_or_build(key, build)
    b = cache.get_or_build(key, build)
    assert a is b and len(calls) == 1 and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    fresh = TargetSetCache(tmp_path / "cache").get_or_build(key, build)
    assert len(calls) == 1 and torch.equal(fresh.ids, a.ids) and fresh.texts == a.texts
    assert torch.equal(fresh.owner, a.owner)
    one = cache.class_names("B", ["p", "q"], tokenizer=tok)
    assert cache.class_names("B", ["p", "q"], tokenizer=tok) is one
    assert cache.class_names("B", ["p", "r"], tokenizer=tok) is not one
    assert cache.vocabulary() is cache.vocabulary()


def test_bad_inputs(tok: ClipTokenizer) -> None:
    with pytest.raises(ValueError, match="at least one class"):
        class_name_targets("E", [], tokenizer=tok)
    with pytest.raises(ValueError, match=r"contain '\{\}'"):
        class_name_targets("E", ["a"], tokenizer=tok, templates=("a photo",))


def test_sampled_vocabulary_keeps_batch_ids_and_remaps_targets() -> None:
    targets = torch.tensor([[5, -1, 900], [5, 42, -1]])
    g = torch.Generator().manual_seed(0)
    cands, remapped = sampled_vocabulary_targets(targets, 20, generator=g)
    assert cands.token_ids is not None
    assert {5, 42, 900} <= set(cands.token_ids.tolist()) and len(cands) <= 23
    assert (remapped == -1).tolist() == (targets == -1).tolist()
    assert torch.equal(cands.token_ids[remapped[targets >= 0]], targets[targets >= 0])
    assert torch.equal(cands.ids[:, 0], cands.token_ids) and (cands.ids[:, 1] == EOT_ID).all()
    pool = torch.tensor([7, 8, 9])
    from_pool, _ = sampled_vocabulary_targets(torch.tensor([5]), 50, pool=pool, generator=g)
    assert from_pool.token_ids is not None and from_pool.token_ids.tolist() == [5, 7, 8, 9]
