"""METEOR 1.5's ``-norm`` text normaliser, re-created from the jar's observed behaviour. Torch-free.

``java -jar meteor-1.5.jar ... -norm`` re-tokenises every segment before matching. The rules below
were found by feeding meteor-1.5.jar (as shipped in pycocoevalcap 1.2) probe strings and reading
the normalised text back from its ``-writeAlignments`` output; they follow the Moses tokenizer's
English rules plus a few changes of the jar's own. In order:

1. ``’ ‘`` become ``'``, ``“ ”`` become ``"`` and the en dash ``–`` becomes a separate ``-``.
2. Whitespace runs collapse to one space; control characters are dropped.
3. Every character that is not a word character, whitespace, ``.``, ``'``, backtick, ``,`` or
   ``-`` becomes its own token. Word characters are ASCII letters and digits, the letters
   U+00C0-U+017E (without ``×`` and ``÷``) and Cyrillic (U+0400-U+052F); all other scripts are
   split one character per token.
4. Runs of two or more periods become one token.
5. Commas are split off unless between two digits (``1,000`` stays), with the Moses tokenizer's
   non-overlapping quirk (``a,b,c`` -> ``a , b,c``).
6. Backticks become ``'``; ``''`` becomes ``"``. Apostrophes: split off between non-letters,
   before a letter when not preceded by a letter or digit, after a letter when not followed by one;
   between letters the apostrophe starts the next token (``n't`` -> ``n 't``); ``1's`` -> ``1 's``.
7. ``--`` becomes ``-``; a hyphen between a word character or period and a word character becomes
   a space, again non-overlapping (``a-b-c`` -> ``a b-c``).
8. A token ending in a period: if the rest holds a period and a letter, all its periods are
   dropped (``p.m.`` -> ``pm``, ``u.s.`` -> ``us``); otherwise the period stays attached after a
   non-breaking prefix (case-sensitive, e.g. ``Mr``), before a token starting with ``a-z``, or after
   a numeric-only prefix (``pp``) before a digit; else it is split off.
9. Everything is lower-cased.
"""

from __future__ import annotations

import re

__all__ = ["NONBREAKING_PREFIXES", "normalize_for_meteor"]

_TITLES_AND_ABBREVIATIONS = (
    "Adj Adm Adv Asst Bart Bldg Brig Bros Capt Cmdr Col Comdr Con Corp Cpl DR Dr Drs Ens "
    "Gen Gov Hon Hr Hosp Insp Lt MM MR MRS MS Maj Messrs Mlle Mme Mr Mrs Ms Msgr Op Ord "
    "Pfc Ph Prof Pvt Rep Reps Res Rev Rt Sen Sens Sfc Sgt Sr St Supt Surg v vs i.e rev e.g "
    "Nos Nr"
)
# The jar's nonbreaking/english.prefixes: 1 = never ends a sentence, 2 = only before a number.
NONBREAKING_PREFIXES: dict[str, int] = {
    **{chr(code): 1 for code in range(ord("A"), ord("Z") + 1)},
    **dict.fromkeys(_TITLES_AND_ABBREVIATIONS.split(), 1),
    **dict.fromkeys(("No", "Art", "pp"), 2),
}

_LETTERS = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u017e\u0400-\u052f"
_WORD = _LETTERS + "0-9"
_UNICODE_PUNCT = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})
_WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")
_CONTROL = re.compile(r"[\x00-\x1f]")
_SPECIAL = re.compile(rf"([^{_WORD} \t\n\r\f\v.'`,\-])")
_MULTI_DOT = re.compile(r"\.(\.+)")
_MULTI_DOT_NEXT = re.compile(r"DOTMULTI\.([^.])")
_MULTI_DOT_END = re.compile(r"DOTMULTI\.")
_COMMA_RULES = (
    (re.compile(r"([^0-9]),([^0-9])"), r"\1 , \2"),
    (re.compile(r"([0-9]),([^0-9])"), r"\1 , \2"),
    (re.compile(r"([^0-9]),([0-9])"), r"\1 , \2"),
)
_APOSTROPHE_RULES = (
    (re.compile(rf"([^{_LETTERS}])'([^{_LETTERS}])"), r"\1 ' \2"),
    (re.compile(rf"([^{_WORD}])'([{_LETTERS}])"), r"\1 ' \2"),
    (re.compile(rf"([{_LETTERS}])'([^{_LETTERS}])"), r"\1 ' \2"),
    (re.compile(rf"([{_LETTERS}])'([{_LETTERS}])"), r"\1 '\2"),
    (re.compile(r"([0-9])'(s)"), r"\1 '\2"),
)
_HYPHEN = re.compile(rf"([{_WORD}.])-([{_WORD}])")
_LETTER = re.compile(rf"[{_LETTERS}]")


def _split_period(word: str, following: str | None) -> str:
    """Step 8 for one whitespace-separated token; `following` is the next token, if any."""
    if len(word) < 2 or not word.endswith("."):
        return word
    prefix = word[:-1]
    if "." in prefix and _LETTER.search(prefix):
        return prefix.replace(".", "")
    kind = NONBREAKING_PREFIXES.get(prefix)
    if kind == 1:
        return word
    if following and "a" <= following[0] <= "z":
        return word
    if kind == 2 and following and following[0].isascii() and following[0].isdigit():
        return word
    return prefix + " ."


def normalize_for_meteor(text: str) -> list[str]:
    """Tokens METEOR 1.5 aligns for one segment, as its ``-norm`` option produces them.

    Args:
        text: one segment (in COCO evaluation: a PTB-tokenised, lower-cased caption).

    Returns:
        The normalised, lower-cased tokens.
    """
    text = text.translate(_UNICODE_PUNCT).replace("\u2013", " - ")
    text = _CONTROL.sub("", _WHITESPACE.sub(" ", f" {text} "))
    text = _SPECIAL.sub(r" \1 ", text)
    text = _MULTI_DOT.sub(r" DOTMULTI\1", text)
    while "DOTMULTI." in text:
        text = _MULTI_DOT_NEXT.sub(r"DOTDOTMULTI \1", text)
        text = _MULTI_DOT_END.sub("DOTDOTMULTI", text)
    for pattern, replacement in _COMMA_RULES:
        text = pattern.sub(replacement, text)
    text = text.replace("`", "'").replace("''", ' " ')
    for pattern, replacement in _APOSTROPHE_RULES:
        text = pattern.sub(replacement, text)
    text = _HYPHEN.sub(r"\1 \2", text.replace("--", "-"))
    words = text.split(" ")
    rebuilt = [
        _split_period(word, words[i + 1] if i + 1 < len(words) else None)
        for i, word in enumerate(words)
    ]
    text = " ".join(rebuilt)
    while "DOTDOTMULTI" in text:
        text = text.replace("DOTDOTMULTI", "DOTMULTI.")
    text = text.replace("DOTMULTI", ".")
    return text.lower().split()
