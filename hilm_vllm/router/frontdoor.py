"""The router's one front door, whatever the transport: a request's prompt and fields become a
`GenerationRequest` under the same caps, and the token stream becomes text with stop strings and
a finish reason the same way. The HTTP app (`openai_api.py`) and gRPC `Generate` (`service.py`)
are thin adapters over it: they parse their own wire format and write their own responses.

- `RequestLimits`: every size a client controls (router flags `--max-*`)
- `prompt_ids`: a prompt (text or token ids) -> checked ids
- `generation_request`: the checks every request passes, then the `GenerationRequest`
- `TextStream`, `StopScanner`, `text_chunks`: tokens -> text, stop strings, finish reason
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from hilm_vllm import codec
from hilm_vllm.errors import InvalidArgument
from hilm_vllm.router.engine import GenerationRequest, RequestStats, Router
from hilm_vllm.router.policy import Policy
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.thresholds import Thresholds

# Stop token ids one request may name: every one rides to the tiers with the session (a
# vocabulary is at most ~256k ids; nobody stops on thousands of them). One cap, codec's.
MAX_STOP_TOKEN_IDS = codec.MAX_STOP_TOKEN_IDS


@dataclass(frozen=True)
class RequestLimits:
    """Caps on what one request may ask for (router flags `--max-*`)."""

    max_output_tokens: int = 4096  # --max-output-tokens
    max_prompt_tokens: int = 8192  # --max-prompt-tokens
    max_stop_sequences: int = 16  # --max-stop-sequences
    max_stop_length: int = 256  # --max-stop-length (characters)
    max_request_bytes: int = 1 << 20  # --max-request-bytes (HTTP body; gRPC prompt text)
    max_n: int = 16  # --max-n (choices of one request)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    def check_output(self, max_tokens: int) -> None:
        if max_tokens > self.max_output_tokens:
            raise InvalidArgument(f"max_tokens is {max_tokens}; this server allows at most "
                                  f"{self.max_output_tokens} (--max-output-tokens)")

    def check_n(self, n: int) -> None:
        if n < 1:
            raise InvalidArgument(f"n must be >= 1, got {n}")
        if n > self.max_n:
            raise InvalidArgument(f"n is {n}; this server allows at most {self.max_n} (--max-n)")

    def check_prompt(self, n: int) -> None:
        if n > self.max_prompt_tokens:
            raise InvalidArgument(f"the prompt has {n} tokens; this server allows at most "
                                  f"{self.max_prompt_tokens} (--max-prompt-tokens)")

    def check_text(self, text: str, what: str = "prompt") -> None:
        if len(text) > self.max_request_bytes:  # characters >= bytes / 4: a cheap first bound
            raise InvalidArgument(f"the {what} has {len(text)} characters; this server allows "
                                  f"at most {self.max_request_bytes} bytes (--max-request-bytes)")

    def check_stops(self, stops: list[str], stop_token_ids=()) -> None:
        """The stop strings and stop token ids of a request (both front doors call this)."""
        if len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgument(f"stop_token_ids has {len(stop_token_ids)} ids; this server "
                                  f"allows at most {MAX_STOP_TOKEN_IDS}")
        if len(stops) > self.max_stop_sequences:
            raise InvalidArgument(f"stop has {len(stops)} strings; this server allows at most "
                                  f"{self.max_stop_sequences} (--max-stop-sequences)")
        longest = max((len(s) for s in stops), default=0)
        if longest > self.max_stop_length:
            raise InvalidArgument(f"a stop string has {longest} characters; this server allows "
                                  f"at most {self.max_stop_length} (--max-stop-length)")


def prompt_ids(prompt: str | Sequence[int], tokenizer, limits: RequestLimits) -> list[int]:
    """A prompt as text (encoded as `vllm serve` does, BOS included) or token ids, checked
    against the caps and the vocabulary."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidArgument("prompt is empty")
        limits.check_text(prompt)
        ids = tokenizer.encode(prompt)
    else:
        limits.check_prompt(len(prompt))  # before scanning it
        codec.check_token_ids(prompt, len(tokenizer), "prompt")
        ids = list(prompt)
    limits.check_prompt(len(ids))
    return ids


def generation_request(router: Router, tokenizer, limits: RequestLimits, ids: Sequence[int],
                       spec: SamplingSpec, max_tokens: int, policy: Policy,
                       ignore_eos: bool = False, skip_rate: float | None = None,
                       block_size: int | None = None, thresholds: Thresholds | None = None,
                       optimistic: bool | None = None, stop_token_ids: Sequence[int] = (),
                       min_tokens: int = 0, stop: Sequence[str] = (),
                       penalties: Mapping | None = None,
                       logprobs: int | None = None,
                       structured: Mapping | None = None) -> GenerationRequest:
    """The checks every request passes, whichever door it came in by: the output cap, the
    policy this router can serve, the stop strings and stop ids (caps, vocabulary)."""
    if max_tokens < 1:
        raise InvalidArgument(f"max_tokens must be >= 1, got {max_tokens}")
    limits.check_output(max_tokens)
    router.check_policy(policy)
    limits.check_stops(list(stop), stop_token_ids)
    codec.check_token_ids(stop_token_ids, len(tokenizer), "stop_token_ids")
    penalties = dict(penalties or {})
    for name in ("logit_bias", "allowed_token_ids"):
        codec.check_token_ids(list(penalties.get(name, ())), len(tokenizer), name)
    return GenerationRequest(tuple(ids), spec, max_tokens, policy, ignore_eos, skip_rate,
                             block_size, thresholds, optimistic, tuple(stop_token_ids),
                             min_tokens, tuple(stop), penalties,
                             codec.check_logprobs(logprobs),
                             dict(structured) if structured else None,
                             codec.bad_words_token_ids(penalties.get("bad_words", ()), tokenizer))


class TextStream:
    """Incremental detokenization: text appears once its bytes are complete.

    vLLM's own incremental detokenizer (`IncrementalDetokenizer`: `tokenizers`' DecodeStream for
    fast tokenizers, else vLLM's Python fallback) decodes each new token against a few tokens of
    context, so a chunk costs O(its tokens), not O(the whole output). Not primed with the prompt:
    the text is exactly `tokenizer.decode(output ids, skip_special_tokens=True)`, chunk by chunk.
    `flush` (the end) decodes the whole output once to emit what an incomplete multi-byte
    character still held back, as that decode does (U+FFFD)."""

    def __init__(self, tokenizer):
        from types import SimpleNamespace

        from vllm import SamplingParams
        from vllm.v1.engine.detokenizer import IncrementalDetokenizer

        self.tokenizer, self.sent = tokenizer, 0
        request = SimpleNamespace(request_id="router", prompt_token_ids=None, prompt_embeds=None,
                                  sampling_params=SamplingParams(skip_special_tokens=True))
        self._detok = IncrementalDetokenizer.from_new_request(tokenizer, request)

    @property
    def ids(self) -> list[int]:
        return self._detok.output_token_ids

    def push(self, ids: list[int]) -> str:
        self._detok.update(list(ids), False)
        delta = self._detok.get_next_output_text(False, True)
        self.sent += len(delta)
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.sent = text[self.sent:], len(text)
        return delta


class StopScanner:
    """OpenAI `stop` strings: text is held back while it could still be the start of one.
    `include` (vLLM's include_stop_str_in_output) keeps the stop string that ended the text.
    `min_tokens`: as vLLM's detokenizer, a stop string counts only if it ends after the text of
    the first min_tokens tokens (`feed` knows where that is)."""

    def __init__(self, stops: list[str], include: bool = False, min_tokens: int = 0):
        self.stops = [s for s in stops if s]
        self.include = include
        self.pending = ""
        self.hit = False
        self.guard = 0  # chars at the start of `pending` a stop string must not end within
        self.min_tokens, self.tokens = min_tokens, 0

    def feed(self, text: TextStream, ids: list[int]) -> str:
        """Detokenize `ids` (the next tokens) with `text` and scan them: the released text."""
        if self.tokens >= self.min_tokens or not self.stops:
            self.tokens += len(ids)
            return self.push(text.push(ids))
        cut = self.min_tokens - self.tokens
        self.tokens += len(ids)
        out = self.push(text.push(ids[:cut]), protected=True)
        return out + self.push(text.push(ids[cut:])) if ids[cut:] else out

    def push(self, text: str, protected: bool = False) -> str:
        if not self.stops:
            return text
        self.pending += text
        if protected:
            self.guard = len(self.pending)
        found = [(i, -len(s), s) for s in self.stops
                 if (i := self.pending.find(s, max(0, self.guard - len(s) + 1))) >= 0]
        if found:
            cut, _, stop = min(found)  # the earliest; of those starting there, the longest
            out, self.pending, self.hit = self.pending[:cut], "", True
            return out + stop if self.include else out
        hold = max(len(s) - 1 for s in self.stops)
        safe = max(0, len(self.pending) - hold)
        out, self.pending = self.pending[:safe], self.pending[safe:]
        self.guard = max(0, self.guard - safe)
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass(frozen=True)
class TextChunk:
    token_ids: list[int]  # the tokens this chunk adds (none on the last)
    text: str  # the text they release (stop strings held back, then cut)
    finish_reason: str | None = None  # on the last chunk: "stop" or "length"
    # per token of token_ids: the tier that decided it, and its logprob when asked
    deciders: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)


async def text_chunks(router: Router, req: GenerationRequest, stats: RequestStats, tokenizer,
                      include_stop: bool = False) -> AsyncIterator[TextChunk]:
    """Run `req` and turn its tokens into text: one chunk per batch of tokens the round makes
    final, then a last chunk with the held-back text and the finish reason (vLLM's: "stop"
    for a stop string or a stop token, "length" for max_tokens or the context's end)."""
    text = TextStream(tokenizer)
    stop = StopScanner(list(req.stop), include_stop, req.min_tokens)
    gen = router.generate(req, stats)
    at = 0  # tokens delivered so far (stats holds one decider, and logprob, per token)
    try:
        async for ids in gen:
            end = at + len(ids)
            yield TextChunk(ids, stop.feed(text, ids), None, stats.deciders[at:end],
                            stats.logprobs[at:end])
            at = end
            if stop.hit:  # the text ends at the stop string; so does generation
                break
    finally:
        await gen.aclose()
    if stop.hit:
        yield TextChunk([], "", "stop")
        return
    tail = stop.push(text.flush())
    if not stop.hit:
        tail += stop.flush()
    finish = "stop" if stop.hit else stats.finish_reason or (
        "length" if stats.tokens >= req.max_tokens else "stop")
    yield TextChunk([], tail, finish)
