"""Deterministic synthetic COCO-like captions for parity tests and the caption-metrics benchmark.

Captions vary casing, punctuation, contractions, possessives, numbers, hyphens, brackets, quotes and
repeated words, so the tokenizer and the n-gram metrics see what real references contain.
"""

from __future__ import annotations

import random

SUBJECTS = [
    "a man",
    "a woman",
    "two dogs",
    "a little girl",
    "the cat",
    "a group of people",
    "an old man",
    "three kids",
    "a young boy",
    "a person",
    "the players",
    "a brown horse",
    "some birds",
    "a chef",
    "a skateboarder",
    "the surfer",
    "a train",
    "a red bus",
    "a giraffe",
    "two zebras",
    "an elephant",
]
VERBS = [
    "is riding",
    "are sitting on",
    "is holding",
    "stands next to",
    "is eating",
    "are playing with",
    "is looking at",
    "jumps over",
    "walks along",
    "is parked near",
    "sits in",
    "is flying over",
    "is cutting",
    "are standing by",
    "rides",
    "carries",
    "is lying on",
    "watches",
]
OBJECTS = [
    "a bike",
    "the beach",
    "a frisbee",
    "a table",
    "a pizza",
    "the street",
    "a wooden bench",
    "a large field",
    "the ocean",
    "a skateboard",
    "a kitchen counter",
    "the train tracks",
    "a snowy hill",
    "a plate of food",
    "a tennis racket",
    "a laptop",
    "the water",
    "a tall tree",
]
EXTRAS = [
    "",
    "",
    "",
    " in the park",
    " at night",
    " on a sunny day",
    " while it's raining",
    " near a building",
    " with a smile",
    " in front of a house",
    " that isn't moving",
    " (on the left)",
    " [blurry]",
    " - a busy scene",
    " -- again",
    "; it's great",
    ": close up",
    " at 5:30 p.m.",
    " for $5.00",
    " with 2.5 pounds of food",
    " and 1,000 people",
    " of 10%",
    " in the U.S.",
    " with mr. smith",
    " etc.",
    " & friends",
    " and/or others",
    " well-known",
    " with a t-shirt",
    " he'd say",
    " we've seen",
    " they're here",
    " can't stop",
    " won't go",
    " i'm sure",
    " you'll see",
    ' "quoted"',
    " 'single'",
    " ...",
    " !!",
    " ?!",
    " 4x4",
    " 2nd",
    " a cafe",
    " café",
    " gonna win",
    " cannot stop",
    " dogs' toys",
    " the man's hat",
    " #1",
    " @home",
    " letter b.",
    " 50 % off",
    " + more",
    " = fun",
    " a/b",
    " 3-4 times",
    " colour",
    " www.example.com",
    " the end. the end",
    " o'clock",
    " rock 'n' roll",
]
ENDS = ["", ".", ".", ".", " .", "!", "?", "...", "..", ". ", " . "]


def synth_caption(rng: random.Random) -> str:
    """One caption: subject, verb, object, an optional extra, an ending; random casing/repeats."""
    words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(EXTRAS)}"
    if rng.random() < 0.15:
        parts = words.split()
        i = rng.randrange(len(parts))
        parts.insert(i, parts[i])
        words = " ".join(parts)
    if rng.random() < 0.2:
        words = f"{words}{rng.choice(EXTRAS)}"
    caption = words + rng.choice(ENDS)
    r = rng.random()
    if r < 0.5:
        caption = caption[0].upper() + caption[1:]
    elif r < 0.55:
        caption = caption.upper()
    elif r < 0.6:
        caption = caption.title()
    if rng.random() < 0.05:
        caption = "  " + caption.replace(" ", "  ", 1) + " "
    return caption


def synth_set(
    n_images: int, n_refs: int = 5, seed: int = 0
) -> tuple[dict[int, str], dict[int, list[str]]]:
    """`n_images` predictions and `n_refs` references each; predictions share words with refs."""
    rng = random.Random(seed)
    preds: dict[int, str] = {}
    refs: dict[int, list[str]] = {}
    for image in range(n_images):
        image_id = 1000 + 7 * image
        refs[image_id] = [synth_caption(rng) for _ in range(n_refs)]
        if rng.random() < 0.3:
            preds[image_id] = rng.choice(refs[image_id]).lower()
        else:
            preds[image_id] = synth_caption(rng).lower().rstrip(" .")
        if rng.random() < 0.03:
            preds[image_id] = rng.choice(["", "a", "a man", "."])
    return preds, refs


def coco_oracle_available() -> bool:
    """pycocoevalcap 1.2 is importable and a `java` is on PATH."""
    import importlib.util
    import shutil

    return (
        importlib.util.find_spec("pycocoevalcap") is not None and shutil.which("java") is not None
    )
