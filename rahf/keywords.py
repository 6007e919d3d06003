"""Prompt words as the RichHF-18K release splits them, and the ` 0`-marked keyword sequence codec."""

from __future__ import annotations

import re
from collections.abc import Sequence

# The official matcher splits on these characters and on the plain space U+0020 only (docs/reference.md, section 3):
# a newline, a tab or a non-breaking space stays inside a word, or the word count (and so the labels) would not match.
_SEPARATORS = ',.?!":; '
_SPLIT_RE = re.compile(f"[{re.escape(_SEPARATORS)}]+")
_WORD_RE = re.compile(f"[^{re.escape(_SEPARATORS)}]+")

MARKER = "0"
# A prompt word equal to the marker is written escaped in the target so that decoding is unambiguous:
# "a 0 0 b" could otherwise mean "a" is misaligned or the word "0" is.
ESCAPED_MARKER = "[0]"


def split_prompt_words(prompt: str) -> list[str]:
    """Splits `prompt` on `,.?!":;` and the plain space, dropping empty pieces, as the RichHF-18K release does.

    Other whitespace (newline, tab, non-breaking or full-width space) is part of a word, as in the release.

    Examples:
        >>> split_prompt_words("a red\\ncat, on a\\u00a0mat")
        ['a', 'red\\ncat', 'on', 'a\\xa0mat']
    """
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a str, got {type(prompt).__name__}")
    return [w for w in _SPLIT_RE.split(prompt) if w]


def is_blank_prompt(prompt: str) -> bool:
    """True when `prompt` has no word with a visible character (e.g. `" , \\t "`, whose only word is a tab)."""
    return not any(w.strip() for w in split_prompt_words(prompt))


def prompt_word_spans(prompt: str) -> list[tuple[int, int]]:
    """The `[start, end)` character spans of `split_prompt_words(prompt)`, in the same order.

    Examples:
        >>> prompt_word_spans("a red, cat")
        [(0, 1), (2, 5), (7, 10)]
    """
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a str, got {type(prompt).__name__}")
    return [m.span() for m in _WORD_RE.finditer(prompt)]


def replace_prompt_word(prompt: str, index: int, word: str) -> str:
    """`prompt` with its `index`-th word (as `split_prompt_words` counts them) replaced by `word`, everything else
    (separators, spacing) kept.

    Examples:
        >>> replace_prompt_word("two red circles, above a cat.", 2, "squares")
        'two red squares, above a cat.'
    """
    spans = prompt_word_spans(prompt)
    if not 0 <= index < len(spans):
        raise ValueError(f"`index` {index} is out of range: {prompt!r} has {len(spans)} words")
    if not word or _SPLIT_RE.search(word):
        raise ValueError(f"`word` must be one word with no separator in it, got {word!r}")
    start, end = spans[index]
    return prompt[:start] + word + prompt[end:]


def _escape(word: str) -> str:
    return ESCAPED_MARKER if word == MARKER else word


def encode_keyword_target(words: Sequence[str], labels: Sequence[int]) -> str:
    """(prompt words, labels) -> the target text, with ` 0` after each misaligned word (label 0).

    Labels follow RichHF-18K: 1 aligned, 0 misaligned.

    Examples:
        >>> encode_keyword_target(["a", "red", "cat"], [1, 0, 1])
        'a red 0 cat'
    """
    if len(words) != len(labels):
        raise ValueError(
            f"`labels` must have one entry per prompt word: got {len(words)} words and {len(labels)} labels"
        )
    pieces = []
    for word, label in zip(words, labels):
        if int(label) not in (0, 1):
            raise ValueError(f"word labels must be 0 (misaligned) or 1 (aligned), got {label!r} for word {word!r}")
        pieces.append(_escape(word))
        if int(label) == 0:
            pieces.append(MARKER)
    return " ".join(pieces)


def _norm(token: str) -> str:
    return token.casefold()


def decode_keyword_indices(generated: str, words: Sequence[str]) -> list[int]:
    """Generated text -> sorted indices of the misaligned words in `words` (the original prompt's words).

    The generation is aligned to the prompt words with an edit-distance alignment, so that a model that drops,
    repeats or misspells words still marks the right ones; a `0` that follows a word marks it. The escaped form
    `[0]` (and, from a model that forgot the escape, a bare `0` where the prompt has one) aligns to a prompt word `0`.

    A prompt word with whitespace inside (`"red\\ncat"`: the release splits on the plain space only) comes back from
    the T5 tokenizer, which normalises whitespace, as several words (`"red cat"`): each word is aligned piece by
    piece, and a marker after any of its pieces marks it.
    """
    pieces: list[str] = []
    owner: list[int] = []
    for index, word in enumerate(words):
        parts = word.split() or [word]  # a word of whitespace only stays one piece (the model never writes it)
        pieces += parts
        owner += [index] * len(parts)
    gen = [piece for word in split_prompt_words(generated) for piece in (word.split() or [word])]
    return sorted({owner[k] for k in _aligned_marks(pieces, gen)})


def _aligned_marks(words: Sequence[str], gen: Sequence[str]) -> set[int]:
    """Indices of `words` that a `0` in `gen` marks, by the edit-distance alignment of `decode_keyword_indices`."""
    n, m = len(words), len(gen)
    targets = [_norm(w) for w in words]
    inf = float("inf")
    # cost[i][j][s]: cheapest alignment of words[:i] with gen[:j]; s = 1 when word i-1 was matched (not dropped),
    # the only case where a following `0` may mark it. back[...] holds the move that got there.
    cost = [[[inf, inf] for _ in range(m + 1)] for _ in range(n + 1)]
    back: list[list[list[tuple | None]]] = [[[None, None] for _ in range(m + 1)] for _ in range(n + 1)]
    cost[0][0][0] = 0.0

    def relax(i: int, j: int, s: int, c: float, move: tuple) -> None:
        # Strict `<` keeps the first move found, and moves are tried in a fixed order: deterministic.
        if c < cost[i][j][s]:
            cost[i][j][s] = c
            back[i][j][s] = move

    for i in range(n + 1):
        for j in range(m + 1):
            for s in (0, 1):
                c = cost[i][j][s]
                if c == inf:
                    continue
                if i < n and j < m:
                    g = _norm(gen[j])
                    same = g == targets[i] or (words[i] == MARKER and g in (ESCAPED_MARKER, MARKER))
                    # A `0` is a marker, never a misspelling of another word.
                    if same or gen[j] != MARKER:
                        relax(i + 1, j + 1, 1, c + (0.0 if same else 1.0), ("match", i, j, s))
                if j < m and s == 1 and gen[j] == MARKER:
                    # Slightly above zero so that, between equal alignments, reading a `0` as the prompt's own word
                    # `0` wins over reading it as a marker.
                    relax(i, j + 1, s, c + 1e-6, ("mark", i, j, s))
                if j < m:
                    relax(i, j + 1, s, c + 1.0, ("insert", i, j, s))
                if i < n:
                    relax(i + 1, j, 0, c + 1.0, ("delete", i, j, s))

    marked: set[int] = set()
    i, j = n, m
    s = 0 if cost[n][m][0] <= cost[n][m][1] else 1
    while (i, j) != (0, 0):
        move = back[i][j][s]
        assert move is not None, "alignment backtrack lost its path"
        kind, i, j, s = move
        if kind == "mark":
            marked.add(i - 1)
    return marked
