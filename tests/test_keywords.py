import random

import pytest

from rahf.keywords import decode_keyword_indices, encode_keyword_target, split_prompt_words


def test_split_matches_the_release():
    assert split_prompt_words('A cat, "sitting" on: a mat?!  (ok)') == [
        "A",
        "cat",
        "sitting",
        "on",
        "a",
        "mat",
        "(ok)",
    ]
    assert split_prompt_words(" ,. ") == []


def test_encode_marks_misaligned_words():
    assert encode_keyword_target(["a", "red", "cat"], [1, 0, 1]) == "a red 0 cat"
    assert encode_keyword_target(["a", "red", "cat"], [0, 0, 0]) == "a 0 red 0 cat 0"


def test_encode_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="one entry per prompt word"):
        encode_keyword_target(["a", "cat"], [1])
    with pytest.raises(ValueError, match="must be 0"):
        encode_keyword_target(["a"], [2])


@pytest.mark.parametrize("seed", range(3))
def test_round_trip_including_prompts_that_contain_zero(seed):
    rng = random.Random(seed)
    vocab = ["a", "0", "cat", "red", "00", "dog", "[0]", "10"]
    for _ in range(500):
        words = [rng.choice(vocab) for _ in range(rng.randint(1, 9))]
        labels = [rng.randint(0, 1) for _ in words]
        decoded = decode_keyword_indices(encode_keyword_target(words, labels), words)
        assert decoded == [i for i, label in enumerate(labels) if label == 0], (words, labels)


def test_decoding_survives_drift():
    words = ["a", "red", "circle", "above", "a", "blue", "square"]
    # dropped word, misspelling, inserted word, punctuation and case changes
    assert decode_keyword_indices("a red 0 circle a blu 0 square", words) == [1, 5]
    assert decode_keyword_indices("A red 0, circle above a very blue square 0.", words) == [1, 6]
    assert decode_keyword_indices("red 0 circle", words) == [1]
    # a trailing marker after a word the generation dropped never marks the dropped word
    assert decode_keyword_indices("a red 0 cat 0", ["a", "red", "cat", "sitting"]) == [1, 2]
    # garbage and empty generations mark nothing
    assert decode_keyword_indices("", words) == []
    assert decode_keyword_indices("0 0 0", words) == []


def test_replace_prompt_word_keeps_everything_else():
    from rahf.keywords import replace_prompt_word

    prompt = ' two "red"  circles, above;a cat. '
    assert split_prompt_words(prompt) == ["two", "red", "circles", "above", "a", "cat"]
    out = replace_prompt_word(prompt, 2, "squares")
    assert out == ' two "red"  squares, above;a cat. '
    assert replace_prompt_word(prompt, 5, "dog") == ' two "red"  circles, above;a dog. '
    for index in range(6):
        words = split_prompt_words(replace_prompt_word(prompt, index, "x"))
        assert words == [("x" if i == index else w) for i, w in enumerate(split_prompt_words(prompt))]
    with pytest.raises(ValueError, match="out of range"):
        replace_prompt_word(prompt, 6, "dog")
    with pytest.raises(ValueError, match="one word"):
        replace_prompt_word(prompt, 0, "two dogs")


def _official_split(prompt: str) -> list[str]:
    """A transcription of the release's rule: each of ,.?!": ; becomes a space, then the prompt is cut at the plain
    space U+0020 and empty pieces are dropped."""
    for ch in ',.?!":;':
        prompt = prompt.replace(ch, " ")
    return [piece for piece in prompt.split(" ") if piece]


@pytest.mark.parametrize(
    "prompt",
    [
        "a red cat,\non a mat",  # newline
        "two dogs\tplaying",  # tab
        "a\u00a0tiny robot",  # non-breaking space
        "sunset\u3000over the sea",  # full-width (ideographic) space
        "a \n cat",  # a word that is only a newline
        "line one\r\nline two.",
        '  "quoted";  words:here?! \u2003em\u2009thin ',
    ],
)
def test_split_is_the_official_rule_for_unusual_whitespace(prompt: str) -> None:
    assert split_prompt_words(prompt) == _official_split(prompt)


def test_split_keeps_non_space_whitespace_inside_words() -> None:
    assert split_prompt_words("a red\ncat") == ["a", "red\ncat"]
    assert split_prompt_words("two dogs\tplaying") == ["two", "dogs\tplaying"]
    assert split_prompt_words("a\u00a0tiny robot") == ["a\u00a0tiny", "robot"]
    assert split_prompt_words("sunset\u3000over") == ["sunset\u3000over"]


def test_blank_prompt_and_replace_word_with_unusual_whitespace() -> None:
    from rahf.keywords import is_blank_prompt, replace_prompt_word

    assert is_blank_prompt(" , \t ") and is_blank_prompt("") and is_blank_prompt("\u3000")
    assert not is_blank_prompt("a \n")
    assert replace_prompt_word("a red\ncat, here", 1, "blue") == "a blue, here"
    assert replace_prompt_word("a\ttab", 0, "x\ty") == "x\ty"


def test_decode_marks_words_with_whitespace_inside_after_the_tokenizer_normalised_it() -> None:
    words = split_prompt_words("a red\ncat,\ton a\u00a0mat")
    assert words == ["a", "red\ncat", "\ton", "a\u00a0mat"]
    target = encode_keyword_target(words, [1, 0, 1, 0])
    normalised = " ".join(target.split())  # what a T5 tokenizer round trip gives: any whitespace -> one space
    assert normalised == "a red cat 0 on a mat 0"
    assert decode_keyword_indices(normalised, words) == [1, 3]
    assert decode_keyword_indices("a red 0 cat on a mat", words) == [1]  # a marker inside the word marks it
    assert decode_keyword_indices(target, words) == [1, 3]
    assert decode_keyword_indices("a \n b 0", ["a", "\n", "b"]) == [2]  # a whitespace-only word is never marked
