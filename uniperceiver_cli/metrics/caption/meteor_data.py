"""Language data for the METEOR 1.5 re-implementation: function words, WordNet synonyms, paraphrases.

When pycocoevalcap is installed, the data is read from the files it ships with METEOR 1.5
(``meteor-1.5.jar`` is a zip holding ``function/english.words`` and ``synonym/english.*``;
``data/paraphrase-en.gz`` is the paraphrase table). Without it the function-word list below (the
same list as the jar's) is used and only the exact and stem modules run. Torch-free.

Synonym look-up, as measured against the jar: a word's WordNet synsets are its own, plus those of
its base forms. If the word is an irregular inflection listed in ``english.exceptions`` the base
forms are the listed ones; otherwise the first WordNet suffix rule (``s``, ``ses``->``s`` ... ``est``
->``e``, in that order) whose result has synsets gives the one base form.

The paraphrase table (5.3 M phrase pairs, 270 MB uncompressed) is loaded restricted to the words of
the corpus being scored (about 10 s per new vocabulary).
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

__all__ = [
    "FUNCTION_WORDS",
    "MeteorResources",
    "load_meteor_resources",
    "load_paraphrases",
    "synonym_ids",
]

logger = logging.getLogger(__name__)

# The jar's function/english.words (used as content/function weighting, delta = 0.75).
_FUNCTION_WORDS_TEXT = (
    "the , . to of and a in that for \" is on 's it with was as said at he by be from have has "
    "are his but an this not i will \u2019 they ) -rrb- ( -lrb- who their had we which were been "
    "more or s its would about new one after you : also up when there than $ all out her people "
    "she year two - can if last first \u201c over other \u201d into some what so -- no time years "
    "could ? 't \u2014 '"
)
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS_TEXT.split())

# WordNet's suffix rules (nouns, verbs, adjectives), tried in this order; the first that yields a
# word with synsets is used.
_SUFFIX_RULES = (
    ("s", ""),
    ("ses", "s"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
    ("es", "e"),
    ("es", ""),
    ("ed", "e"),
    ("ed", ""),
    ("ing", "e"),
    ("ing", ""),
    ("er", ""),
    ("est", ""),
    ("er", "e"),
    ("est", "e"),
)


@dataclass(frozen=True)
class MeteorResources:
    """Language data for the matcher.

    Attributes:
        function_words: words weighted by (1 - delta) instead of delta.
        synsets: word -> WordNet synset ids (empty: synonym module off).
        exceptions: irregular inflected form -> its base forms.
        paraphrase_file: the gzipped paraphrase table (None: paraphrase module off).
        source: where the data came from ("meteor-1.5.jar" or "builtin").
    """

    function_words: frozenset[str]
    synsets: Mapping[str, frozenset[str]] = field(default_factory=dict)
    exceptions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    paraphrase_file: Path | None = None
    source: str = "builtin"

    @property
    def modules(self) -> tuple[str, ...]:
        """The matching modules these resources enable, in METEOR's order."""
        names = ["exact", "stem"]
        if self.synsets:
            names.append("synonym")
        if self.paraphrase_file is not None:
            names.append("paraphrase")
        return tuple(names)


def _meteor_dir() -> Path | None:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "meteor"
    return folder if (folder / "meteor-1.5.jar").is_file() else None


def _line_pairs(text: str) -> Iterable[tuple[str, str]]:
    lines = text.split("\n")
    return zip(lines[0::2], lines[1::2], strict=False)


@lru_cache(maxsize=1)
def load_meteor_resources() -> MeteorResources:
    """Read METEOR's English data from pycocoevalcap's copy of METEOR 1.5, or use built-in data.

    Returns:
        The resources; ``source`` and ``modules`` say what was found.
    """
    folder = _meteor_dir()
    if folder is None:
        logger.info("pycocoevalcap not installed: METEOR uses exact + stem matching only")
        return MeteorResources(function_words=FUNCTION_WORDS)
    with zipfile.ZipFile(folder / "meteor-1.5.jar") as archive:
        words = archive.read("function/english.words").decode("utf-8").split("\n")
        synset_text = archive.read("synonym/english.synsets").decode("utf-8")
        exception_text = archive.read("synonym/english.exceptions").decode("utf-8")
    synsets = {word: frozenset(ids.split()) for word, ids in _line_pairs(synset_text) if word}
    inverted: dict[str, list[str]] = {}
    for base, forms in _line_pairs(exception_text):
        for form in forms.split():
            inverted.setdefault(form, []).append(base)
    paraphrases = folder / "data" / "paraphrase-en.gz"
    if not paraphrases.is_file():
        logger.warning("%s is missing: METEOR runs without its paraphrase module", paraphrases)
    return MeteorResources(
        function_words=frozenset(w for w in words if w),
        synsets=synsets,
        exceptions={form: tuple(bases) for form, bases in inverted.items()},
        paraphrase_file=paraphrases if paraphrases.is_file() else None,
        source="meteor-1.5.jar",
    )


def synonym_ids(word: str, resources: MeteorResources) -> frozenset[str]:
    """WordNet synset ids METEOR's synonym module compares for `word` (see the module docstring).

    Args:
        word: a normalised token.
        resources: the language data.

    Returns:
        The synset ids (empty when the word is unknown).
    """
    synsets = resources.synsets
    ids = set(synsets.get(word, ()))
    bases = resources.exceptions.get(word)
    if bases is not None:
        for base in bases:
            ids.update(synsets.get(base, ()))
        return frozenset(ids)
    for suffix, replacement in _SUFFIX_RULES:
        if len(word) > len(suffix) and word.endswith(suffix):
            base_ids = synsets.get(word[: -len(suffix)] + replacement)
            if base_ids:
                ids.update(base_ids)
                break
    return frozenset(ids)


@lru_cache(maxsize=4)
def load_paraphrases(
    path: Path, vocabulary: frozenset[str]
) -> dict[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """The paraphrase table restricted to phrase pairs made only of `vocabulary` words.

    Entries keep the table's direction and order (the matcher looks both ways itself, and the
    order decides ties in the alignment search); a pair listed twice stays listed twice.

    Args:
        path: METEOR's ``paraphrase-en.gz`` (lines: probability, phrase, paraphrase).
        vocabulary: every token that can occur in the segments to score.

    Returns:
        phrase words -> the paraphrases listed for it, in table order.
    """
    known = {word.encode("utf-8") for word in vocabulary}
    table: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    with gzip.open(path, "rb") as stream:
        lines = iter(stream)
        for _, first, second in zip(lines, lines, lines, strict=False):
            first_words = first.split()
            second_words = second.split()
            if all(w in known for w in first_words) and all(w in known for w in second_words):
                phrase = tuple(w.decode("utf-8") for w in first_words)
                table.setdefault(phrase, []).append(tuple(w.decode("utf-8") for w in second_words))
    logger.info("loaded %d paraphrase phrases for a %d-word vocabulary", len(table), len(known))
    return {phrase: tuple(others) for phrase, others in table.items()}
