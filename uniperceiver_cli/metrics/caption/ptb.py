"""PTB-style caption tokenisation matching pycocoevalcap 1.2 without Java.

pycocoevalcap runs Stanford CoreNLP 3.4.1's ``PTBTokenizer -preserveLines -lowerCase`` over all
captions (one per line) and then drops a fixed list of punctuation tokens. This module re-implements
the lexer rules that matter for captions as a longest-match scanner (ties go to the earlier rule, as
in JFlex) and applies the same punctuation filter. Known quirks reproduced on purpose:

* brackets become ``-lrb-``/``-rrb-``/``-lsb-``/``-rsb-``/``-lcb-``/``-rcb-`` and are *not* removed
  (pycocoevalcap's list holds the upper-case forms, but the tokenizer lower-cases them first);
* runs such as ``!!``, ``?!`` are one token and are kept; only single ``!``/``?`` are removed;
* a single-letter abbreviation (``b.``) keeps its period unless a sentence end follows, and the
  lexer looks across the line break into the *next* caption for that;
* ``£`` becomes ``#``, ``€`` becomes ``$``, ``¢`` becomes ``cents``; characters outside the Basic
  Multilingual Plane (emoji) are deleted.

Rare constructs (URLs with trailing punctuation, ``5'10``, ``a...b``) may differ; the parity tests
measure the agreement. Torch-free.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

__all__ = ["PUNCTUATION_TOKENS", "tokenize_caption", "tokenize_captions"]

#: Tokens pycocoevalcap 1.2 removes after tokenisation (its list, as compared after lower-casing).
PUNCTUATION_TOKENS = frozenset(
    ["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_LET = r"[^\W\d_]"
_AN = r"[^\W_]"

# Abbreviations that keep their period whatever follows (case-insensitive in CoreNLP 3.4.1).
_ABBREV_ANY_CASE = [
    "mr",
    "mrs",
    "ms",
    "dr",
    "drs",
    "prof",
    "profs",
    "sen",
    "sens",
    "rep",
    "reps",
    "atty",
    "attys",
    "lt",
    "col",
    "gen",
    "messrs",
    "gov",
    "govs",
    "adm",
    "rev",
    "maj",
    "sgt",
    "cpl",
    "pvt",
    "mt",
    "capt",
    "st",
    "ste",
    "ave",
    "pres",
    "lieut",
    "hon",
    "brig",
    "cmdr",
    "comdr",
    "pfc",
    "spc",
    "supt",
    "supts",
    "det",
    "mme",
    "mlle",
    "inc",
    "co",
    "cos",
    "corp",
    "ltd",
    "plc",
    "bancorp",
    "dept",
    "bhd",
    "assn",
    "univ",
    "intl",
    "sys",
    "tel",
    "est",
    "ext",
    "sq",
    "jr",
    "sr",
    "bros",
    "blvd",
    "rd",
    "esq",
    "etc",
    "al",
    "seq",
    "bldg",
    "vs",
    "alex",
    "wm",
    "jos",
    "cie",
    "cf",
    "treas",
    "jan",
    "feb",
    "mar",
    "apr",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
    "mon",
    "tue",
    "tues",
    "wed",
    "thu",
    "thurs",
    "fri",
    "ala",
    "ariz",
    "calif",
    "colo",
    "conn",
    "fla",
    "ga",
    "ind",
    "kan",
    "kans",
    "ky",
    "md",
    "mich",
    "minn",
    "mo",
    "mont",
    "neb",
    "nev",
    "okla",
    "tenn",
    "va",
    "vt",
    "wis",
    "wyo",
    "ft",
    "ph",
]
# Abbreviations that are also common words: only the capitalised / upper-case forms keep the period.
_ABBREV_CAPITALISED = ["miss", "ark", "del", "ill", "la", "mass", "ore", "pa", "tex", "wash"]


def _abbrev_pattern() -> str:
    any_case = "|".join(sorted(_ABBREV_ANY_CASE, key=len, reverse=True))
    capital = "|".join(
        form
        for word in sorted(_ABBREV_CAPITALISED, key=len, reverse=True)
        for form in (word.capitalize(), word.upper())
    )
    return rf"(?P<tok>(?:(?i:{any_case})|{capital}|[Pp]ty)\.)"


_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CURRENCY = {"£": "#", "€": "$", "¢": "cents"}
_QUOTE_OPEN = {"“": "``", "‘": "`", "``": "``", "`": "`", "„": "``"}

Handler = Callable[[str], list[str]]


def _same(tok: str) -> list[str]:
    return [tok]


def _split_after_three(tok: str) -> list[str]:
    return [tok[:3], tok[3:]]


def _dashes(tok: str) -> list[str]:
    return ["--"] if len(tok) <= 4 else [tok]


def _quote(tok: str) -> list[str]:
    return [_QUOTE_OPEN.get(tok, "''" if tok in {'"', "''", "”"} else "'")]


# (name, pattern, handler). The pattern's group "tok" (or the whole match) is consumed; the full match
# length, lookahead text included, decides the longest match like JFlex's trailing context.
_RULES: list[tuple[str, str, Handler]] = [
    ("split3", r"(?P<tok>(?i:cannot|gonna|gotta|lemme|gimme|wanna))(?!\w)", _split_after_three),
    ("apos_t", r"(?P<tok>'[tT])(?i:is|was)", _same),
    ("apos_n", r"'[nN]'", _same),
    ("apos_num", r"'\d+", _same),
    ("y_apos", r"[yY]'", _same),
    ("sgml", r"</?[A-Za-z!?][^<>\n]*>", _same),
    ("url", r"(?:https?://|ftp://|www\.)[^\s<>\"]*[^\s<>\".,;:!?)'\]]", _same),
    ("email", r"[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}", _same),
    ("tag", rf"[#@]{_LET}\w*", _same),
    ("word_aux", rf"(?P<tok>{_AN}\w*)'(?i:s|m|d|re|ve|ll)(?!{_LET})", _same),
    ("aux", rf"'(?i:s|m|d|re|ve|ll)(?!{_LET})", _same),
    ("word_nt", rf"(?P<tok>{_LET}+?)(?i:n't)", _same),
    ("nt", r"(?i:n't)", _same),
    (
        "apoword",
        rf"(?i:'(?:em|cause|til|till|n'?|[2-9]0s)|ol'|somethin'|dunkin'|c'mon|e'er|s'mores|ev'ry"
        rf"|li'l|nat'l|nor'easter|cont'd)(?!{_LET})"
        rf"|[a-hj-xzA-HJ-XZ]'{_LET}{{2,}}|{_LET}+[aeiouyAEIOUY]'[aeiouA-Z]{_LET}*",
        _same,
    ),
    ("acronym", rf"{_LET}(?:\.{_LET})+\.?", _same),
    ("abbrev", _abbrev_pattern(), _same),
    ("letter_dot", r"(?P<tok>[A-Za-z]\.)", _same),
    ("date", r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}", _same),
    ("frac", r"(?:\d{1,4}-)?\d{1,4}/\d{1,4}", _same),
    ("number", r"[-+]?(?:\d*(?:[.:,]\d+)+|\d+)", _same),
    ("slashword", rf"{_AN}+(?:-{_AN}+){{0,2}}(?:/{_AN}+(?:-{_AN}+){{0,2}}){{1,2}}", _same),
    ("word", r"\w+(?:-\w+)*", _same),
    ("hword", rf"{_AN}[\w.,]*(?:-{_AN}\w*)+", _same),
    ("dotword", rf"{_LET}\w*(?:[.!?]{_LET}\w*)+", _same),
    ("thinga", r"[A-Z]+(?:&[A-Z]+)+", _same),
    ("ellipsis", r"\.\.\.|…", lambda _tok: ["..."]),
    ("bang", r"[?!]+", _same),
    ("dashes", r"-{2,}", _dashes),
    ("longdash", r"[\u2013\u2014\u2015\u0096\u0097]", lambda _tok: ["--"]),
    ("amp", r"&amp;|&", lambda _tok: ["&"]),
    ("dollar", r"[A-Z]*\$", _same),
    ("quote", r"''|``|[\"'`“”‘„]", _quote),
]
_COMPILED = [(name, re.compile(pattern), handler) for name, pattern, handler in _RULES]
_PLAIN_WORD = re.compile(rf"{_LET}+(?=[ \t]|$)")
_SPECIAL_PLAIN = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])
_SPACE = re.compile(r"[\s\u00a0\u2000-\u200a\u3000]+")


# Capitalised words that CoreNLP 3.4.1 treats as a sentence start after a single-letter abbreviation
# (measured against the jar; the lexer holds a fixed list of this kind).
_SENTENCE_STARTERS = [
    "A",
    "An",
    "As",
    "At",
    "But",
    "He",
    "Her",
    "However",
    "If",
    "In",
    "It",
    "Many",
    "Now",
    "One",
    "Our",
    "Some",
    "She",
    "So",
    "That",
    "The",
    "Their",
    "There",
    "These",
    "They",
    "This",
    "We",
    "What",
    "When",
    "While",
    "Yet",
    "You",
    "Here",
]
_SENTENCE_START = re.compile(
    r"\s+(?:" + "|".join(sorted(_SENTENCE_STARTERS, key=len, reverse=True)) + r")(?![^\W\d_])"
)


def _sentence_end_follows(text: str, pos: int) -> bool:
    """Whether a single-letter abbreviation ending before `pos` closes a sentence (keeps no period)."""
    return _SENTENCE_START.match(text, pos) is not None


def _scan(line: str, following: str | None) -> list[str]:
    text = line + "\n" + following[:40] if following is not None else line
    end = len(line)
    tokens: list[str] = []
    pos = 0
    while pos < end:
        space = _SPACE.match(text, pos)
        if space is not None:
            pos = space.end()
            continue
        plain = _PLAIN_WORD.match(line, pos)
        if plain is not None and plain.group().lower() not in _SPECIAL_PLAIN:
            tokens.append(plain.group())
            pos = plain.end()
            continue
        best_len = 0
        best: tuple[str, Handler, int] | None = None
        for name, regex, handler in _COMPILED:
            match = regex.match(line, pos)
            if match is None:
                continue
            full = match.end() - pos
            if full <= best_len:
                continue
            tok = match.group("tok") if "tok" in regex.groupindex else match.group()
            if name == "letter_dot" and _sentence_end_follows(text, pos + len(tok)):
                continue
            best_len = full
            best = (tok, handler, len(tok))
        if best is None:
            char = line[pos]
            pos += 1
            if char in _BRACKETS:
                tokens.append(_BRACKETS[char])
            elif char in _CURRENCY:
                tokens.append(_CURRENCY[char])
            elif ord(char) <= 0xFFFF and not "\u20a5" <= char <= "\u20cf":
                # Astral characters (emoji) and newer currency signs are untokenizable: deleted.
                tokens.append(char)
            continue
        tok, handler, consumed = best
        tokens.extend(handler(tok))
        pos += consumed
    return tokens


def _normalise(text: str) -> str:
    # CoreNLP reads U+2019 as an apostrophe and U+2018 as a left quote.
    return text.replace("\n", " ").replace("\u2019", "'").replace("\u2018", "`")


def tokenize_caption(caption: str, following: str | None = None) -> list[str]:
    """Tokenise one caption like PTBTokenizer + pycocoevalcap's punctuation filter.

    Args:
        caption: raw caption text (newlines are treated as spaces, as pycocoevalcap does).
        following: the next caption in the same tokenizer call, or None for the last one; the lexer
            peeks at its first characters to decide whether a single-letter abbreviation ends a
            sentence.

    Returns:
        Lower-cased tokens with the removable punctuation tokens dropped.
    """
    line = _normalise(caption)
    nxt = _normalise(following) if following is not None else None
    raw = _scan(line, nxt)
    return [tok.lower() for tok in raw if tok.lower() not in PUNCTUATION_TOKENS]


def tokenize_captions(captions: Sequence[str]) -> list[str]:
    """Tokenise captions as one pycocoevalcap tokenizer call does (lines see their successor).

    Args:
        captions: N raw captions, in the order pycocoevalcap would write them to its file.

    Returns:
        N space-joined tokenised captions.
    """
    out: list[str] = []
    for index, caption in enumerate(captions):
        following = captions[index + 1] if index + 1 < len(captions) else None
        out.append(" ".join(tokenize_caption(caption, following)))
    return out
