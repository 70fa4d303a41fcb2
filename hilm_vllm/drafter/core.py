"""Drafter domain logic: sessions of token ids, drafts on a vLLM engine, rollback and append.

A session is the token history the router decided on plus the drafter's provisional tokens. A
Draft is one vLLM request whose prompt is the whole history (the prefix cache reuses its KV, so
only the tail since the last full block is recomputed) and whose `max_tokens` is the block
size. The uncertainty processor observes every drafted position in the same steps
(`hilm_vllm.drafter.processor`); one `collective_rpc("hilm_pop_draft")` per Draft reads it back.

Drafted tokens are appended to the session at once (the position advances by the drafted
count); the router then `rollback`s to the accepted prefix and `append`s the verifier's tokens.

Seeds. A session seed (the client's, else a random one) derives a vLLM seed per Draft from
(seed, position) and the perturbation noise per absolute position: rolling back and drafting
again from the same position reproduces the same tokens and the same u, also at T > 0.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import dataclass, field, replace

import numpy as np

from hilm_vllm.drafter import metrics
from hilm_vllm.drafter.processor import DRAFT_ARG, DraftOptions
from hilm_vllm.errors import FailedPrecondition, HilmError, InvalidArgument, Unavailable
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.sessions import Session, SessionLimits, SessionStore
from hilm_vllm.uncertainty import UncertaintyConfig, derive_seed

logger = logging.getLogger("hilm.drafter")

SAMPLER_STREAM = 0  # derive_seed stream of the per-Draft vLLM seed (1 is the processor's noise)
POP_RPC = "hilm_pop_draft"


@dataclass(frozen=True)
class DrafterSettings:
    """The drafter tier's own settings (hilm-serve flags; see tier.add_cli_args)."""

    max_sessions: int = 256
    session_ttl_s: float = 600.0
    max_draft_tokens: int = 64  # largest block one Draft may ask for
    draft_top_k: int = 0  # cap on the top-k the drafter samples with; 0 = the request's
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)  # session default

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.session_ttl_s <= 0 or self.max_draft_tokens < 1:
            raise ValueError("max_sessions, session_ttl_s and max_draft_tokens must be positive")
        if self.draft_top_k < 0:
            raise ValueError(f"draft_top_k must be >= 0 (0 = off), got {self.draft_top_k}")


@dataclass(frozen=True)
class ModelInfo:
    vocab_size: int
    eos_token_id: int | None
    max_model_len: int

    @classmethod
    def from_engine(cls, engine) -> ModelInfo:
        config = engine.model_config
        eos = getattr(engine.tokenizer, "eos_token_id", None)  # None: --skip-tokenizer-init
        if eos is None:
            eos = getattr(config.hf_text_config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list) else eos
        return cls(config.get_vocab_size(), eos, config.max_model_len)


@dataclass
class DrafterSession:
    tokens: list[int]  # prompt + decided tokens + provisional drafts
    prompt_len: int
    spec: SamplingSpec  # what the drafter samples with (top-k capped by --draft-top-k)
    seed: int
    seeded: bool  # the client gave a seed: vLLM's sampler is seeded too
    uncertainty: UncertaintyConfig
    limit: int  # most tokens the session may hold
    drafts: int = 0  # Draft calls so far (unique request keys)


@dataclass(frozen=True)
class DraftedToken:
    token_id: int
    uncertainty: float
    ids: np.ndarray  # [S] int32, support of the distribution the token was sampled from
    probs: np.ndarray  # [S] float32, its probabilities (sum to 1)


@dataclass(frozen=True)
class DraftResult:
    tokens: list[DraftedToken]
    position: int
    early_stop: bool = False  # ended by stop_uncertainty (the forced stop token is dropped)
    queue_ms: float = 0.0
    forward_ms: float = 0.0
    total_ms: float = 0.0


def effective_top_k(request_top_k: int, draft_top_k: int) -> int:
    """min(request, drafter cap), where 0 means off on either side."""
    if draft_top_k <= 0:
        return request_top_k
    return draft_top_k if request_top_k <= 0 else min(request_top_k, draft_top_k)


def drafted_tokens(readout: dict) -> list[DraftedToken]:
    """The worker's readout (see processor.Draft.readout) -> DraftedTokens."""
    return [DraftedToken(t, u, np.frombuffer(i, dtype=np.int32), np.frombuffer(p, dtype=np.float32))
            for t, u, i, p in zip(readout["tokens"], readout["u"], readout["ids"],
                                  readout["probs"])]


def engine_timings(output) -> tuple[float, float]:
    """(queue_ms, forward_ms) from vLLM's request stats, when the engine logs them."""
    stats = getattr(output, "metrics", None)
    if stats is None or not getattr(stats, "scheduled_ts", 0):
        return 0.0, 0.0
    return ((stats.scheduled_ts - stats.queued_ts) * 1e3,
            (stats.last_token_ts - stats.scheduled_ts) * 1e3)


class Drafter:
    def __init__(self, engine, info: ModelInfo, settings: DrafterSettings,
                 store: SessionStore[DrafterSession] | None = None):
        self.engine, self.info, self.settings = engine, info, settings
        if store is None:
            store = SessionStore(SessionLimits(settings.max_sessions, settings.session_ttl_s))
        self.sessions = store

    # ---- validation -------------------------------------------------------------------------
    def check_ids(self, ids: list[int], what: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.info.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(f"{what} token id {bad} is outside the vocabulary "
                                  f"[0, {self.info.vocab_size}): send ids of the model's tokenizer")

    def check_position(self, session: Session[DrafterSession], position: int) -> None:
        current = len(session.state.tokens)
        if position != current:
            raise FailedPrecondition(
                f"session {session.id} is at position {current}, not {position}: resend with "
                f"position={current} (Rollback or Append first if your history differs)")

    def tokenize(self, text: str) -> list[int]:
        if self.engine.tokenizer is None:
            raise InvalidArgument("this drafter runs without a tokenizer (--skip-tokenizer-init): "
                                  "send prompt.token_ids")
        return list(self.engine.tokenizer.encode(text))

    # ---- RPCs -------------------------------------------------------------------------------
    def open(self, owner: str, prompt: list[int] | str, spec: SamplingSpec,
             uncertainty: UncertaintyConfig | None, max_tokens: int) -> Session[DrafterSession]:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidArgument("the prompt is empty: send at least one token id or some text")
        self.check_ids(ids, "prompt")
        if len(ids) >= self.info.max_model_len:
            raise InvalidArgument(
                f"the prompt has {len(ids)} tokens; max-model-len is {self.info.max_model_len}: "
                f"shorten it, or serve the drafter with a larger --max-model-len")
        if max_tokens < 0:
            raise InvalidArgument(f"max_tokens must be >= 0 (0 = up to max-model-len), "
                                  f"got {max_tokens}")
        limit = self.info.max_model_len
        if max_tokens:
            limit = min(limit, len(ids) + max_tokens)
        seeded = spec.seed is not None
        seed = spec.seed if seeded else secrets.randbits(63)
        spec = replace(spec, top_k=effective_top_k(spec.top_k, self.settings.draft_top_k))
        state = DrafterSession(list(ids), len(ids), spec, seed, seeded,
                               uncertainty or self.settings.uncertainty, limit)
        session = self.sessions.open(owner, state)
        metrics.SESSIONS.set(len(self.sessions))
        return session

    async def draft(self, owner: str, sid: str, position: int, max_tokens: int,
                    stop_uncertainty: float | None = None) -> DraftResult:
        if not 1 <= max_tokens <= self.settings.max_draft_tokens:
            raise InvalidArgument(f"max_tokens must be in [1, {self.settings.max_draft_tokens}] "
                                  f"(--max-draft-tokens), got {max_tokens}")
        if stop_uncertainty is not None and math.isnan(stop_uncertainty):
            raise InvalidArgument("stop_uncertainty is NaN: send a bound in [0, 1] or leave it "
                                  "unset")
        session = self.sessions.get(sid, owner)
        async with session.lock:
            self.check_position(session, position)
            state = session.state
            room = state.limit - len(state.tokens)
            if room <= 0:
                raise InvalidArgument(
                    f"session {sid} holds {len(state.tokens)} tokens, its limit (prompt + "
                    f"max_tokens, or max-model-len): nothing is left to draft; close it")
            t0 = time.perf_counter()
            result = await self._draft(session, min(max_tokens, room), stop_uncertainty)
            state.tokens += [t.token_id for t in result.tokens]
            metrics.observe_draft(len(result.tokens), time.perf_counter() - t0, result.early_stop)
            return replace(result, position=len(state.tokens),
                           total_ms=(time.perf_counter() - t0) * 1e3)

    async def rollback(self, owner: str, sid: str, position: int) -> int:
        session = self.sessions.get(sid, owner)
        async with session.lock:
            tokens = session.state.tokens
            if position > len(tokens):
                raise FailedPrecondition(
                    f"cannot roll session {sid} forward: it is at position {len(tokens)}, "
                    f"asked for {position}; use Append to add tokens")
            if position < 1:
                raise InvalidArgument(f"position must be >= 1 (a context needs a token), "
                                      f"got {position}")
            del tokens[position:]
            return len(tokens)

    async def append(self, owner: str, sid: str, position: int, token_ids: list[int]) -> int:
        session = self.sessions.get(sid, owner)
        async with session.lock:
            self.check_position(session, position)
            self.check_ids(token_ids, "appended")
            state = session.state
            if len(state.tokens) + len(token_ids) > state.limit:
                raise InvalidArgument(
                    f"appending {len(token_ids)} tokens at position {position} would exceed the "
                    f"session's limit of {state.limit} (prompt + max_tokens, or max-model-len)")
            state.tokens += token_ids
            return len(state.tokens)

    def close(self, owner: str, sid: str) -> None:
        self.sessions.close(sid, owner)
        metrics.SESSIONS.set(len(self.sessions))

    # ---- the engine ---------------------------------------------------------------------------
    def sampling_params(self, session: Session[DrafterSession], key: str, n: int,
                        stop_uncertainty: float | None):
        from vllm import SamplingParams

        state = session.state
        position = len(state.tokens)
        stop_token, stop_ids = self.info.eos_token_id, []
        if stop_uncertainty is not None and stop_token is None:
            stop_token, stop_ids = 0, [0]  # no EOS: make token 0 a stop token for this draft
        options = DraftOptions(key=key, seed=state.seed, base=position,
                               uncertainty=state.uncertainty, stop_uncertainty=stop_uncertainty,
                               stop_token=-1 if stop_uncertainty is None else stop_token)
        seed = derive_seed(state.seed, position, SAMPLER_STREAM) if state.seeded else None
        return SamplingParams(**(state.spec.vllm_kwargs() | {"seed": seed}), max_tokens=n,
                              stop_token_ids=stop_ids, detokenize=False,
                              extra_args={DRAFT_ARG: options.to_extra_args()})

    async def _draft(self, session: Session[DrafterSession], n: int,
                     stop_uncertainty: float | None) -> DraftResult:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs.engine import tokens_input

        state = session.state
        state.drafts += 1
        key = f"{session.id}-{state.drafts}"
        params = self.sampling_params(session, key, n, stop_uncertainty)
        try:
            final = None
            async for out in self.engine.generate(tokens_input(list(state.tokens)), params, key):
                final = out
            readout = (await self.engine.collective_rpc(POP_RPC, args=(key,)))[0]
        except asyncio.CancelledError:
            asyncio.ensure_future(self._discard(key))  # the client left: free the worker record
            raise
        except (ValueError, VLLMClientError) as e:  # vLLM's request validation
            asyncio.ensure_future(self._discard(key))
            raise InvalidArgument(f"the drafter's engine refused the draft: {e}") from e
        except Exception as e:  # the engine died or failed: not the client's fault
            asyncio.ensure_future(self._discard(key))
            logger.exception("draft %s failed", key)
            raise Unavailable(f"the drafter's engine failed this draft ({type(e).__name__}: "
                              f"{e}); retry, or reopen the session if it persists") from e
        return self._result(final, readout, key)

    @staticmethod
    def _result(final, readout: dict | None, key: str) -> DraftResult:
        if readout is None:
            raise HilmError(f"draft {key}: the uncertainty processor saw no token; is the "
                            f"engine running with the drafter's logits processor?")
        engine_tokens = list(final.outputs[0].token_ids)
        if engine_tokens[:len(readout["tokens"])] != readout["tokens"]:
            raise HilmError(f"draft {key}: processor and engine disagree on the tokens: the "
                            f"processor no longer matches this vLLM's sampler")
        queue_ms, forward_ms = engine_timings(final)
        return DraftResult(drafted_tokens(readout), 0, readout["forced_stop"] is not None,
                           queue_ms, forward_ms)

    async def _discard(self, key: str) -> None:
        try:
            await self.engine.collective_rpc(POP_RPC, args=(key,))
        except Exception:  # best effort; the worker's store is bounded anyway
            logger.debug("could not discard draft %s", key, exc_info=True)
