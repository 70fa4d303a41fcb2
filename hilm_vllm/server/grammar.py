"""Structured outputs on a session's rows, with vLLM's own xgrammar backend.

vLLM 0.32 constrains a request by masking its logits with its grammar's token bitmask before the
sampler (`apply_grammar_bitmask`), the grammar having accepted the request's output so far;
with speculative decoding it fills one bitmask per draft row, the grammar advanced over the
draft tokens before the row. A session here is the same thing spread over tiers: the drafter
masks each position it drafts (so it drafts inside the grammar, and q is the masked law), a
verifier masks each of its n + 1 rows with the grammar's state after the committed output and
the draft tokens before the row (so p is the LLM's constrained law and a draft token the grammar
refuses has p = 0). Lossless policies therefore sample exactly the LLM's constrained law.

The grammar is compiled with vLLM's `XgrammarBackend` for this engine (its tokenizer, its
vocabulary, its `--structured-outputs-config` whitespace options), after vLLM's own request
validation (`validate_xgrammar_grammar`: a choice becomes a grammar), with the request's stop
tokens as vLLM passes them (EOS and stop_token_ids). A `Tracker` per session holds an xgrammar
matcher and the output tokens it has accepted: a row is matched by cutting back to the longest
common prefix with the row's output and accepting the rest (xgrammar rolls back without a
limit), so rollbacks cost what they cut and every row's mask is the one a fresh matcher
would give. Trackers and compiled grammars are bounded (least recently used dropped; a dropped
tracker is rebuilt from the output it is next given).
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch

from hilm_vllm.errors import InvalidArgument
from hilm_vllm.sampling import SamplingSpec, Structured
from hilm_vllm.server.engine_session import common_prefix

MAX_TRACKERS = 1024  # sessions with a live grammar per process
MAX_COMPILED = 64  # compiled grammars kept per process (xgrammar caches compilation too)
SUPPORTED_BACKENDS = ("auto", "xgrammar")  # --structured-outputs-config backends accepted


def grammar_key(structured: Structured):
    """vLLM's (StructuredOutputOptions, spec) for the constraint, after vLLM's validation;
    ValueError (vLLM's message) when vLLM would refuse it."""
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar
    from vllm.v1.structured_output.request import get_structured_output_key

    params = SamplingParams(structured_outputs=StructuredOutputsParams(
        **json.loads(structured.params)))
    validate_xgrammar_grammar(params)  # a choice becomes a grammar here, as in vLLM
    return get_structured_output_key(params.structured_outputs)


def check(structured: Structured | None, vllm_config) -> None:
    """Can this tier's engine apply the constraint? InvalidArgument saying why not."""
    if structured is None:
        return
    model = vllm_config.model_config
    if model.skip_tokenizer_init:
        raise InvalidArgument("structured output needs a tokenizer; this tier runs with "
                              "--skip-tokenizer-init")
    backend = vllm_config.structured_outputs_config.backend
    if backend not in SUPPORTED_BACKENDS:
        raise InvalidArgument(
            f"structured output: this tier's engine runs --structured-outputs-config backend "
            f"{backend!r}; a session's rows are masked with vLLM's xgrammar backend: start the "
            f"tier with backend 'xgrammar' or 'auto'")
    from vllm.exceptions import VLLMClientError

    try:
        grammar_key(structured)
    except (ValueError, TypeError, VLLMClientError) as e:  # vLLM refuses it
        raise InvalidArgument(f"structured output: {e}") from None


class Tracker:
    """One session's grammar state: an xgrammar matcher and the output tokens it accepted."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.tokens: list[int] = []

    def sync(self, output: Sequence[int]) -> bool:
        """Match `output` (cut back to the common prefix, accept the rest); False when a token
        of it is outside the grammar (the tracker then holds the longest valid prefix)."""
        keep = common_prefix(self.tokens, output)
        if keep < len(self.tokens):
            self.matcher.rollback(len(self.tokens) - keep)
            del self.tokens[keep:]
        for token in output[keep:]:
            if self.matcher.is_terminated() or not self.matcher.accept_token(int(token)):
                return False
            self.tokens.append(int(token))
        return True


class RowGrammars:
    """A process's grammars: vLLM's xgrammar backend for its engine (built on first use),
    compiled grammars, and a Tracker per session key."""

    def __init__(self, vllm_config, tokenizer=None):
        self.vllm_config = vllm_config
        self.tokenizer = tokenizer  # None: the engine's (vLLM's cached tokenizer of the model)
        self._backend = None
        self._compiled: OrderedDict = OrderedDict()  # (kind, spec) -> xgrammar CompiledGrammar
        self._trackers: OrderedDict = OrderedDict()  # (session, constraint) -> Tracker

    @property
    def vocab_size(self) -> int:
        return self.vllm_config.model_config.get_vocab_size()

    def backend(self):
        if self._backend is None:
            from vllm.tokenizers import cached_tokenizer_from_config
            from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

            tokenizer = self.tokenizer or cached_tokenizer_from_config(
                self.vllm_config.model_config)
            self._backend = XgrammarBackend(self.vllm_config, tokenizer=tokenizer,
                                            vocab_size=self.vocab_size)
        return self._backend

    def compiled(self, structured: Structured):
        key = grammar_key(structured)
        ctx = self._compiled.get(key)
        if ctx is None:
            ctx = self._compiled[key] = self.backend().compile_grammar(*key).ctx
            while len(self._compiled) > MAX_COMPILED:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return ctx

    def tracker(self, session: Hashable, structured: Structured) -> Tracker:
        key = (session, structured)
        tracker = self._trackers.get(key)
        if tracker is None:
            import xgrammar as xgr

            stops = sorted(structured.stop_token_ids)
            tracker = self._trackers[key] = Tracker(xgr.GrammarMatcher(
                self.compiled(structured), override_stop_tokens=stops or None))
            while len(self._trackers) > MAX_TRACKERS:
                self._trackers.popitem(last=False)
        self._trackers.move_to_end(key)
        return tracker

    def bitmask(self, rows: Sequence[tuple[Hashable, Structured, Sequence[int]]]
                ) -> torch.Tensor:
        """One bitmask row (xgrammar's int32 layout, on the CPU) per (session key, constraint,
        context): the tokens the grammar allows after `context` (every token up to and
        including the row's position; the grammar reads it from `output_start` on). A row
        whose context left the grammar (a draft token it refuses: that token's own row gives
        it p = 0, so no row after it decides anything) or ended it (a stop token, after which
        the request ends) allows every token."""
        import xgrammar as xgr

        out = xgr.allocate_token_bitmask(len(rows), self.vocab_size)  # all allowed
        for i, (session, structured, context) in enumerate(rows):
            tracker = self.tracker(session, structured)
            if (tracker.sync(context[structured.output_start:])
                    and not tracker.matcher.is_terminated()):
                tracker.matcher.fill_next_token_bitmask(out, i)
        return out


def for_session(spec: SamplingSpec, engine, stop_token_ids: Sequence[int]) -> SamplingSpec:
    """A session's spec on this tier: its constraint checked against the engine's config
    (`check`) and given the session's stop tokens (EOS and stop_token_ids, as vLLM gives its
    grammar). The engine is only read when there is a constraint."""
    if spec.structured is None:
        return spec
    check(spec.structured, engine.vllm_config)
    return dataclasses.replace(spec, structured=dataclasses.replace(
        spec.structured, stop_token_ids=tuple(stop_token_ids)))
