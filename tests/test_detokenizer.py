"""Incremental detokenization on a byte-level BPE that splits multi-byte characters; stop-string helpers."""

from __future__ import annotations

import pytest
from fenwick_llm.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer, StopStrings
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = ["hello world, the quick brown fox jumps over the lazy dog", "streaming text one token at a time"]
TEXT = "hello 世界! café — 🦊 jumps over the lazy 🐶 dog, ça va? 日本語のテキスト"


class Wrapped:
    """The `decode(ids, skip_special_tokens)` shape of engine.tokenizer.Tokenizer."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids


@pytest.fixture(scope="module")
def tok() -> Wrapped:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    t.train_from_iterator(CORPUS * 20, trainer)
    return Wrapped(t)


def test_multibyte_characters_are_split_across_tokens(tok: Wrapped) -> None:
    ids = tok.encode(TEXT)
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)  # the test exercises partial characters


@pytest.mark.parametrize("prompt", ["", "say: ", "emoji 🦊"], ids=["none", "ascii", "emoji"])
def test_streamed_text_equals_full_decode_and_never_has_replacement(tok: Wrapped, prompt: str) -> None:
    prompt_ids = tok.encode(prompt) if prompt else []
    ids = tok.encode(TEXT)
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.step(i) for i in ids]
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == TEXT == tok.decode(ids)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens had to wait for the rest of a character


def test_special_tokens_skipped_or_kept(tok: Wrapped) -> None:
    eos = tok.tok.token_to_id("<eos>")
    ids = tok.encode("hello") + [eos]
    skip = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    keep = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(skip.step(i) for i in ids) == "hello"
    assert "".join(keep.step(i) for i in ids) == "hello<eos>"


def test_flush_releases_a_truly_incomplete_tail(tok: Wrapped) -> None:
    ids = tok.encode("a🦊")
    detok = IncrementalDetokenizer(tok, [])
    text = "".join(detok.step(i) for i in ids[:-1])
    assert REPLACEMENT not in text
    assert REPLACEMENT in text + detok.flush()


def find(text: str, stops: list[str], fed: int = 0) -> tuple[int, str] | None:
    """(start index, stop) of the first stop string ending in text[fed:], text[:fed] fed before."""
    m = StopStrings(stops)
    state, _ = m.feed(0, text[:fed])
    _, match = m.feed(state, text[fed:])
    return None if match is None else (fed + match[0] - len(match[1]), match[1])


def held(text: str, stops: list[str]) -> int:
    m = StopStrings(stops)
    return m.held(m.feed(0, text)[0])


def test_find_stop_and_holdback() -> None:
    assert find("abc STOP def", ["STOP"]) == (4, "STOP")
    assert find("abc STO", ["STOP"]) is None
    assert find("xx abSTOP", ["STOP", "ab"], fed=4) == (3, "ab")  # 'ab' ends inside the new text
    assert find("abcd", ["abcd", "bc"]) == (1, "bc")  # the earliest end wins, whatever the tokens
    assert find("xabcd", ["bcd", "abcd"]) == (1, "abcd")  # the longest of those ending there
    assert find("aaab", ["aab"]) == (1, "aab")  # a failed partial match falls back, not restarts
    assert held("hello ST", ["STOP"]) == 2
    assert held("hello S", ["STOP", "xyz"]) == 1
    assert held("hello", ["STOP"]) == 0
    assert held("aaa", ["aaab"]) == 3
    assert held("abab", ["abac"]) == 2  # the longest suffix that can still grow into a stop


def test_stop_strings_match_a_brute_force_search() -> None:
    import random

    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        ends = [(i + len(s), -len(s), s) for s in stops for i in range(len(text)) if text.startswith(s, i)]
        want = None if not ends else min(ends)
        got = find(text, stops)
        assert got == (None if want is None else (want[0] + want[1], want[2])), (text, stops)
        if got is None:
            brute = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            assert held(text, stops) == brute, (text, stops)
