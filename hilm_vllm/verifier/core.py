"""The `Verifier`: sessions, and the engine calls that verify a block or generate.

A session lives in the engine as one long-lived vLLM request (`server/engine_session.py`).
One Verify = one chunk of it: the engine is handed what it does not hold of history + append +
draft (it cuts back its rejected drafts first), max_tokens = 1, `wire.VerifyArgs` in the chunk's
extra_args; the worker hook (`worker.py`) does the exact accept / recover step in the same
forward pass and pushes m to this process (`channel.py`). Sessions' chunks run concurrently and
vLLM's scheduler batches them; only calls of one session wait for each other. Idle sessions'
requests hold KV: past a share of the cache the least recently used are closed, and their next
Verify opens a new request from the history this tier keeps.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field

import numpy as np

from hilm_vllm.errors import HilmError, InvalidArgument, Unavailable
from hilm_vllm import codec
from hilm_vllm.sampling import SamplingSpec, ScoredToken, TokenLogprob, Truncation
from hilm_vllm.server.engine_session import (Chunk, EngineSession, ResidentSessions,
                                             SessionLost)
from hilm_vllm.server import grammar
from hilm_vllm.server.gate import BatchGate
from hilm_vllm.server.grpc_util import is_engine_client_error
from hilm_vllm.server.caps import (DEFAULT_EXEMPT_PRINCIPALS, DEFAULT_MAX_CLIENT_SAMPLES,
                                    DEFAULT_MAX_SESSIONS_PER_CLIENT, check_caps)
from hilm_vllm.sessions import SessionLimits as StoreLimits
from hilm_vllm.sessions import SessionStore
from hilm_vllm.uncertainty import UncertaintyConfig
from hilm_vllm.verifier import metrics
from hilm_vllm.verifier.channel import ResultChannel
from hilm_vllm.verifier.messages import GenerateChunk, OpenedSession, Prompt
from hilm_vllm.verifier.session import (SessionLimits, Timings, VerifierSession, VerifyCall,
                                        VerifyReply, check_block)
from hilm_vllm.verifier.wire import ROWS_CACHED, EmitArgs, VerifyArgs, VerifyResult, unpack

logger = logging.getLogger("hilm.verifier")


@dataclass(frozen=True)
class VerifierSettings:
    """The tier's own settings (hilm-serve flags; see tier.add_cli_args)."""

    max_sessions: int = 256
    session_ttl_s: float = 600.0
    max_block: int = 16  # draft tokens per Verify; the hook's cost grows with n x vocab
    # How emitted tokens' uncertainty is measured when a Verify does not say (flags
    # --uncertainty-gate, --uncertainty-samples, --theta-max, --perturbation).
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    max_sessions_per_client: int = DEFAULT_MAX_SESSIONS_PER_CLIENT
    max_client_samples: int = DEFAULT_MAX_CLIENT_SAMPLES  # largest K a Verify may ask for
    exempt_principals: tuple[str, ...] = DEFAULT_EXEMPT_PRINCIPALS  # not per-client capped
    # Verifications arriving within this many ms of each other enter the engine together, so
    # they share an engine step (server/gate.py); 0 = each at once (--verify-batch-window-ms)
    batch_window_ms: float = 0.0
    # A Verify with return_emitted verifies against p truncated so (and emits exactly that law):
    # --emit-top-k, --emit-eps
    emit_truncation: Truncation = field(default_factory=Truncation)

    def __post_init__(self) -> None:
        check_caps(self.max_client_samples, self.uncertainty.num_samples, self.max_sessions,
                   self.max_sessions_per_client)
        if not 0 <= self.batch_window_ms <= 1000:
            raise ValueError(f"--verify-batch-window-ms must be in [0, 1000], got "
                             f"{self.batch_window_ms}")


@dataclass(frozen=True)
class EngineFacts:
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]  # every id the model stops on (empty: none)

    @property
    def eos_token_id(self) -> int:
        """The primary EOS, -1 when the model names none."""
        return self.eos_token_ids[0] if self.eos_token_ids else -1

    @classmethod
    def of(cls, engine) -> EngineFacts:
        config = engine.model_config
        return cls(config.get_vocab_size(), config.max_model_len,
                   codec.eos_token_ids(config, engine.tokenizer))




# How long a round waits for its pushed result once the engine's output is in; it is normally
# there already (pushed before the output left the worker). Past this, hilm_pop_verify fetches it.
CHANNEL_GRACE_S = 1.0
# Draft distributions with more entries than this (over the block) are checked in a thread.
INLINE_CHECK_ENTRIES = 4096
# A result neither pushed in the grace nor kept by the worker (it was pushed: the worker keeps
# only what it could not push) is awaited this much longer before the round fails.
CHANNEL_LATE_S = 30.0


def emitted_tokens(result: VerifyResult, expected: list[int]) -> tuple[ScoredToken, ...]:
    """The worker's emitted rows -> ScoredTokens, checked against what the engine emitted:
    the same tokens, each inside its own distribution (else the hook no longer matches the
    engine, and a next tier would refuse the block as a draft)."""
    tokens = tuple(ScoredToken(e.token, e.u, unpack(e.ids, "<i4"),
                               unpack(e.probs, "<f2").astype(np.float32))
                   for e in result.emitted)
    if [t.token_id for t in tokens] != expected:
        raise HilmError(f"the hook's emitted tokens {[t.token_id for t in tokens]} are not the "
                        f"engine's {expected}: the hook no longer matches this vLLM's runner")
    for t in tokens:
        if not np.any((t.ids == t.token_id) & (t.probs > 0)):
            raise HilmError(f"emitted token {t.token_id} has probability 0 in the verifier's "
                            f"own p: the hook no longer matches this vLLM's sampler")
    return tokens


@contextmanager
def engine_errors() -> Iterator[None]:
    """vLLM's failures as this tier's errors: the engine's own checks are the client's."""
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        yield
    except EngineDeadError as e:
        raise Unavailable("the vLLM engine died; the tier must be restarted") from e
    except (HilmError, SessionLost, asyncio.CancelledError):
        raise
    except ValueError as e:  # vLLM's request validation (VLLMValidationError and others)
        raise InvalidArgument(f"the engine refused the request: {e}") from e
    except Exception as e:  # e.g. EngineGenerateError: INTERNAL with its cause, not UNKNOWN
        if is_engine_client_error(e):  # a check this tier missed: still the client's
            raise InvalidArgument(f"the engine refused the request: {e}") from e
        logger.exception("engine request failed")
        raise HilmError(f"the engine failed on this request: {e!r}") from e


class Verifier:
    def __init__(self, engine, settings: VerifierSettings, facts: EngineFacts,
                 channel: ResultChannel | None = None):
        self.engine = engine  # vllm AsyncLLM with the verifier worker hook installed
        self.settings = settings
        self.facts = facts
        self.channel = channel  # None: every result is fetched with hilm_pop_verify
        # Each session's engine request (server/engine_session.py), closed with the session.
        self.resident = ResidentSessions.of(engine)
        self.gate = BatchGate(settings.batch_window_ms / 1e3)
        self.sessions: SessionStore[VerifierSession] = SessionStore(
            StoreLimits(settings.max_sessions, settings.session_ttl_s,
                        settings.max_sessions_per_client, settings.exempt_principals),
            on_drop=lambda session: self.resident.drop(session.id))

        metrics.SESSIONS.set_function(lambda: len(self.sessions))
        metrics.RESIDENT_SESSIONS.set_function(lambda: len(self.resident))
        metrics.EVICTED_SESSIONS.set_function(lambda: self.resident.evicted)

    @classmethod
    async def start(cls, engine, settings: VerifierSettings) -> Verifier:
        """Install the worker hook on a running AsyncLLM, with a result channel to here."""
        channel = ResultChannel()
        installed = await engine.collective_rpc("hilm_install_verifier",
                                                args=(channel.address, channel.token))
        logger.info("verifier hook: %s; results pushed to %s", installed, channel.address)
        return cls(engine, settings, EngineFacts.of(engine), channel)

    # ---- sessions -----------------------------------------------------------------------

    async def open_session(self, owner: str, prompt: Prompt, spec: SamplingSpec,
                           max_tokens: int = 0, min_tokens: int = 0,
                           stop_token_ids: Sequence[int] = ()) -> OpenedSession:
        if max_tokens < 0:
            raise InvalidArgument(f"max_tokens must be >= 0 (0 = up to max-model-len), "
                                  f"got {max_tokens}")
        if min_tokens < 0:
            raise InvalidArgument(f"min_tokens must be >= 0, got {min_tokens}")
        codec.check_token_ids(stop_token_ids, self.facts.vocab_size, "stop_token_ids")
        ids = self._prompt_ids(prompt)
        stop_ids = tuple(dict.fromkeys([*self.facts.eos_token_ids, *stop_token_ids]))
        spec = grammar.for_session(spec, self.engine, stop_ids)
        limits = SessionLimits(self.facts.vocab_size, self.facts.max_model_len,
                               self.settings.max_block, max_tokens or None, min_tokens,
                               stop_ids)
        session = self.sessions.open(owner, VerifierSession(ids, len(ids), spec, limits))
        return OpenedSession(session.id, len(ids), tuple(ids), self.facts.eos_token_id,
                             self.facts.vocab_size, self.settings.max_block,
                             self.facts.eos_token_ids, self.facts.max_model_len)

    async def close_session(self, owner: str, session_id: str) -> None:
        self.sessions.close(session_id, owner)

    async def verify(self, owner: str, session_id: str, call: VerifyCall) -> VerifyReply:
        received = time.perf_counter()
        session = self.sessions.get(session_id, owner)
        state = session.state
        if call.support > INLINE_CHECK_ENTRIES:
            # Checking the distributions (and digesting them for replay) is numpy over every
            # entry: off the event loop, so other sessions' rounds are not held behind it.
            await asyncio.to_thread(self._check_block, call, state.limits)
        else:  # a thread hop (~0.1 ms) costs more than checking a small block
            self._check_block(call, state.limits)
        async with session.lock:
            if (reply := state.replay(call)) is not None:
                return reply
            state.check(call, block_checked=True)
            reply = await self._score(session.id, state, call, received)
            state.advance(call, reply)
            metrics.observe_verify(len(call.draft), reply.num_accepted,
                                   time.perf_counter() - received)
            return reply

    @staticmethod
    def _check_block(call: VerifyCall, limits: SessionLimits) -> None:
        check_block(call, limits)
        call.digest  # noqa: B018 - cached on the call: computed here, off the loop if large

    # ---- engine calls ---------------------------------------------------------------------

    async def _score(self, sid: str, state: VerifierSession, call: VerifyCall,
                     received: float) -> VerifyReply:
        base = state.base(call)
        prompt = [*state.context(call), *call.append, *call.draft]
        # Seeded by the absolute position of the first draft row: strictly increasing over a
        # session's calls even across rollbacks, so no two calls share their uniforms.
        draw_seed, sample_seed = state.seeds(base + len(call.append))
        emit = (EmitArgs(call.uncertainty or self.settings.uncertainty, state.noise_seed,
                         self.settings.emit_truncation)
                if call.want_emitted else None)
        ban_rows = state.ban_rows(call)  # the stop ids ride along only when they are masked
        ban = (state.limits.stop_ids, ban_rows) if ban_rows else ((), 0)
        args = VerifyArgs.build(uuid.uuid4().hex, state.spec, draw_seed, call.dists, emit, *ban,
                                logprobs=call.logprobs)
        started = time.perf_counter()
        token, result = await self._verify_request(sid, prompt, state, args, sample_seed)
        if result.error == ROWS_CACHED:
            # The session's first request found rows of its draft in the prefix cache (another
            # session with the same content, or a request preempted mid-chunk): a new request
            # that does not read the cache.
            args = VerifyArgs.build(uuid.uuid4().hex, state.spec, draw_seed, call.dists, emit,
                                    *ban, logprobs=call.logprobs)
            token, result = await self._verify_request(sid, prompt, state, args, sample_seed,
                                                       fresh=True)
        if result.error is not None:
            raise HilmError(f"verification failed inside the engine: {result.error}")
        now = time.perf_counter()
        engine_ms = (now - started) * 1e3
        timings = Timings(max(0.0, engine_ms - result.forward_ms), result.forward_ms,
                          (now - received) * 1e3)
        m = result.num_accepted
        emitted = emitted_tokens(result, [*call.draft[:m], token]) if call.want_emitted else ()
        return VerifyReply(m, token, base + len(call.append) + m + 1,
                           result.target_probs if call.want_target_probs else (), timings,
                           emitted, result.logprobs)

    async def _verify_request(self, sid: str, prompt: list[int], state: VerifierSession,
                              args: VerifyArgs, sample_seed: int, fresh: bool = False
                              ) -> tuple[int, VerifyResult]:
        """One chunk of the session's engine request: the engine is handed only what it does
        not hold, and keeps at most the context before the draft's first row, so the n + 1 rows
        the hook needs are computed in this forward. `fresh`: a new request that does not read
        the prefix cache (after ROWS_CACHED)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            **(state.spec.vllm_kwargs() | {"seed": sample_seed}), max_tokens=1,
            detokenize=False, output_kind=RequestOutputKind.DELTA,
            skip_reading_prefix_cache=fresh, extra_args=args.to_extra_args())
        pushed = self.channel.expect(args.key) if self.channel else None
        try:
            try:
                await self.gate.wait()  # several sessions' verifications, one engine step
                engine_session = self.resident.reopen(sid) if fresh else self.resident.get(sid)
                chunk = await self._run_chunk(engine_session, prompt, params,
                                              len(prompt) - args.n - 1)
            except SessionLost:  # evicted or aborted under us: once more, on a new request
                chunk = await self._run_chunk(self.resident.reopen(sid), prompt, params,
                                              len(prompt) - args.n - 1)
            token = chunk.token_ids[0]
            result = await self._result(args.key, pushed)
        finally:
            if self.channel:
                self.channel.forget(args.key)
        metrics.ENGINE_TOKENS_SENT.inc(chunk.sent)
        if result.recovered is not None and result.recovered != token:
            raise HilmError(f"engine emitted {token}, the hook recovered {result.recovered}: "
                            f"the hook no longer matches this vLLM's model runner")
        return token, result

    async def _run_chunk(self, engine_session: EngineSession, prompt: list[int], params,
                         max_keep: int) -> Chunk:
        with engine_errors():
            return await engine_session.run(prompt, params, max_keep)

    async def _result(self, key: str, pushed: asyncio.Future | None) -> VerifyResult:
        if pushed is not None:
            try:
                # shielded: a timeout here must not cancel the future, or a push arriving late
                # (a busy event loop) would be dropped and the round failed
                return await asyncio.wait_for(asyncio.shield(pushed), CHANNEL_GRACE_S)
            except TimeoutError:
                logger.warning("verify result %s not pushed in %.1f s; fetching it by RPC",
                               key, CHANNEL_GRACE_S)
        raw = (await self.engine.collective_rpc("hilm_pop_verify", args=(key,)))[0]
        if raw is not None:
            return VerifyResult.from_dict(raw)
        if pushed is not None:
            # The worker keeps only results it could not push: this one was pushed and is on
            # its way (a loaded machine), so wait for it a while longer.
            try:
                return await asyncio.wait_for(pushed, CHANNEL_LATE_S)
            except TimeoutError:
                pass
        raise HilmError("the verifier hook produced no result: is it installed "
                        "(hilm_install_verifier) in this engine?")

    async def _engine_generate(self, prompt, params) -> AsyncIterator:
        with engine_errors():
            stream = self.engine.generate(prompt, params, request_id=uuid.uuid4().hex)
            async with aclosing(stream):  # a consumer that stops early aborts the request now
                async for out in stream:
                    yield out

    async def generate(self, prompt: Prompt, spec: SamplingSpec, max_tokens: int = 0,
                       ignore_eos: bool = False, stop_token_ids: Sequence[int] = (),
                       min_tokens: int = 0, stop: Sequence[str] = (),
                       penalties: Mapping | None = None, logprobs: int | None = None,
                       structured: Mapping | None = None, prompt_logprobs: int | None = None
                       ) -> AsyncIterator[GenerateChunk]:
        """Plain streaming generation (the LLM-only baseline), with vLLM's own stop rules
        (EOS of the model's generation config, `stop_token_ids`, `min_tokens`, `stop`) and
        sampler transforms (`penalties`: codec.PENALTY_FIELDS as SamplingParams takes them);
        `prompt_logprobs`: vLLM's, in the first chunk.
        Cancelling the consumer aborts the vLLM request (AsyncLLM.generate aborts on
        CancelledError / GeneratorExit)."""
        from vllm import SamplingParams
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        ids = self._prompt_ids(prompt)
        if max_tokens < 0:
            raise InvalidArgument(f"max_tokens must be >= 0 (0 = up to max-model-len), "
                                  f"got {max_tokens}")
        codec.check_token_ids(stop_token_ids, self.facts.vocab_size, "stop_token_ids")
        room = max_tokens or self.facts.max_model_len - len(ids)
        if not 0 <= min_tokens <= room:
            raise InvalidArgument(f"min_tokens must be in [0, {room}] (max_tokens, or what "
                                  f"max-model-len leaves after the prompt), got {min_tokens}")
        if stop and self.engine.tokenizer is None:
            raise InvalidArgument("stop strings need a tokenizer; this tier runs with "
                                  "--skip-tokenizer-init: send stop_token_ids")
        params = SamplingParams(**spec.vllm_kwargs(), max_tokens=max_tokens or None,
                                ignore_eos=ignore_eos, output_kind=RequestOutputKind.DELTA,
                                detokenize=self.engine.tokenizer is not None,
                                stop_token_ids=list(stop_token_ids), min_tokens=min_tokens,
                                stop=list(stop) or None, logprobs=logprobs,
                                structured_outputs=None if not structured else
                                StructuredOutputsParams(**structured),
                                prompt_logprobs=prompt_logprobs, **dict(penalties or {}))
        first = True
        async for out in self._engine_generate(tokens_input(ids), params):
            c = out.outputs[0]
            prompt = ()
            if first and prompt_logprobs is not None:
                prompt = ranked_logprobs(ids[1:], (out.prompt_logprobs or [None])[1:],
                                         prompt_logprobs)
            first = False
            yield GenerateChunk(tuple(c.token_ids), c.text or "",
                                c.finish_reason if out.finished else None,
                                () if logprobs is None else vllm_logprobs(c, logprobs), prompt)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise InvalidArgument("this tier runs without a tokenizer "
                                      "(--skip-tokenizer-init): send prompt.token_ids")
            ids = list(self.engine.tokenizer.encode(prompt))
        else:
            ids = list(prompt)
        if not ids:
            raise InvalidArgument("prompt is empty: send prompt.token_ids or prompt.text")
        codec.check_token_ids(ids, self.facts.vocab_size, "prompt")
        if len(ids) + 1 > self.facts.max_model_len:
            raise InvalidArgument(f"prompt has {len(ids)} tokens; with the next token it must "
                                  f"fit max-model-len {self.facts.max_model_len}: shorten it")
        return ids


def vllm_logprobs(completion, top: int) -> tuple[TokenLogprob, ...]:
    """vLLM's per-token logprobs of a (delta) CompletionOutput asked with `logprobs=top` -> one
    TokenLogprob per token: the sampled token's, and the `top` tokens of ranks 1..top (vLLM
    lists them, and the sampled token with its own rank)."""
    return ranked_logprobs(completion.token_ids, completion.logprobs or (), top)


def ranked_logprobs(tokens, entries, top: int) -> tuple[TokenLogprob, ...]:
    """vLLM's logprob entries ({token: Logprob(logprob, rank)} per position, for `tokens`)
    -> one TokenLogprob per token with the `top` tokens of ranks 1..top."""
    out = []
    for token, entry in zip(tokens, entries):
        ranked = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items()
                        if lp.rank is not None and 1 <= lp.rank <= top)
        out.append(TokenLogprob(entry[token].logprob, tuple(t for _, t, _ in ranked),
                                tuple(v for _, _, v in ranked)))
    return tuple(out)
