"""The router's incremental detokenization (`TextStream`) with the tiny family's byte-level BPE
tokenizer: multi-byte characters span several tokens, so text must be held back until they are
complete, and the text streamed must be exactly the whole output's decode."""

from __future__ import annotations

import random

import pytest

from hilm_vllm.router.frontdoor import TextStream

TEXTS = ["héllo wörld 日本語 🙂 done", "def f(x):\n    return x ** 2  # ünïcödé ✓✓✓",
         "🙂🙂🙂 emoji only 🙃", "plain ascii, nothing else"]


@pytest.fixture(scope="module")
def tokenizer(tiny_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_zoo.llm))


def stream(tokenizer, ids: list[int], rng: random.Random) -> tuple[list[str], str]:
    """Push `ids` in random chunks of 1-4 tokens; (the deltas, the flush)."""
    text, deltas, i = TextStream(tokenizer), [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        deltas.append(text.push(ids[i:i + n]))
        i += n
    return deltas, text.flush()


@pytest.mark.parametrize("seed", range(3))
def test_streamed_text_is_the_whole_decode_and_never_a_broken_character(tokenizer, seed):
    rng = random.Random(seed)
    for sample in TEXTS:
        ids = tokenizer.encode(sample, add_special_tokens=False)
        assert len(ids) > len(sample.encode()) / 4  # the tokenizer really splits characters
        deltas, tail = stream(tokenizer, ids + [tokenizer.eos_token_id], rng)
        assert "".join(deltas) + tail == sample
        assert not any("\ufffd" in d for d in deltas)  # nothing half-decoded is ever sent


def test_an_incomplete_last_character_is_flushed_as_the_decode_shows_it(tokenizer):
    ids = tokenizer.encode("ok 🙂", add_special_tokens=False)
    cut = ids[:-1]  # the emoji's last byte never comes
    deltas, tail = stream(tokenizer, cut, random.Random(0))
    assert "".join(deltas) + tail == tokenizer.decode(cut, skip_special_tokens=True)
    assert "".join(deltas) == "ok " and tail.endswith("\ufffd")


def test_random_token_ids_stream_to_the_same_text_as_one_decode(tokenizer):
    rng = random.Random(7)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 60))]
        deltas, tail = stream(tokenizer, ids, rng)
        assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_each_chunk_costs_its_own_tokens_not_the_whole_output(tokenizer, monkeypatch):
    """The old TextStream re-decoded the whole output on every chunk: n tokens one at a time
    decoded n(n+1)/2 token ids. Now only the final flush decodes the whole output once."""
    decoded = []
    real = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: decoded.append(len(ids)) or
                        real(ids, **kw))
    ids = tokenizer.encode("x = [i * i for i in range(100)]  # ✓ " * 8, add_special_tokens=False)
    deltas, tail = stream(tokenizer, ids, random.Random(1))
    assert "".join(deltas) + tail == real(ids, skip_special_tokens=True)
    assert sum(decoded) <= 2 * len(ids), (sum(decoded), len(ids))


def _stop_text(tokenizer, ids: list[int], stops: list[str], min_tokens: int, chunk: int):
    from hilm_vllm.router.frontdoor import StopScanner

    text, stop, out = TextStream(tokenizer), StopScanner(stops, min_tokens=min_tokens), ""
    for i in range(0, len(ids), chunk):
        out += stop.feed(text, ids[i:i + chunk])
        if stop.hit:
            return out, True
    return out + stop.push(text.flush()) + stop.flush(), False


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_stop_strings_count_only_after_min_tokens_as_vllms_detokenizer(tokenizer, chunk):
    """vLLM checks stop strings only in text that ends after the first min_tokens tokens
    (detokenizer.py, PR 22014): a stop inside them is not a stop; one ending after them is."""
    ids = tokenizer.encode("ab;cd;ef", add_special_tokens=False)
    first = len(tokenizer.encode("ab;", add_special_tokens=False))
    assert _stop_text(tokenizer, ids, [";"], 0, chunk) == ("ab", True)
    assert _stop_text(tokenizer, ids, [";"], first, chunk) == ("ab;cd", True)
    assert _stop_text(tokenizer, ids, [";"], len(ids), chunk) == ("ab;cd;ef", False)
    # a stop string that straddles the boundary ends after it: it counts
    two = len(tokenizer.encode("ab", add_special_tokens=False))
    assert _stop_text(tokenizer, ids, ["b;c"], two, chunk) == ("a", True)
