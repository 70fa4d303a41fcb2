"""Drafter domain logic: sessions of token ids, drafts on a vLLM engine, rollback and append.

A session is the token history the router decided on plus the drafter's provisional tokens. It
lives in the engine as one long-lived vLLM request (`server/engine_session.py`); a Draft is one
chunk of it: the engine is handed only the tokens it does not hold (it cuts back the drafts that
were not kept first), and `max_tokens` is the block size. The uncertainty processor observes every drafted position in the same steps
(`hilm_vllm.drafter.processor`) and the worker's step hook pushes each finished position to this
process (`DraftResults`): concurrent Drafts are batched by vLLM and nothing waits behind the
engine core.

Drafted tokens are appended to the session at once (the position advances by the drafted
count). A Draft may first cut the session back (`rollback_to`) and append tokens decided
elsewhere (`append`): the router's correction and other tiers' tokens ride on the next Draft,
so a round costs one device call. `rollback` and `append` remain separate RPCs for other clients.

Seeds. A session seed (the client's, else a random one) derives, per absolute position, the
uniform the processor draws the token with and the perturbation noise of u: rolling back and
drafting again from the same position reproduces the same tokens and the same u, also at T > 0.

Proposals. Each token is drawn from q = the request's temperature / top-k / top-p, then
truncated (`--draft-top-k`, `--draft-eps`: `sampling.Truncation`) and shipped exactly, as float16
weights: speculative sampling is exact for any proposal the verifier knows exactly, so a
128k-vocabulary model ships at most `--draft-top-k` entries per token, not its vocabulary.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from hilm_vllm.drafter import metrics
from hilm_vllm.drafter.processor import DRAFT_ARG, DraftOptions, readout_of
from hilm_vllm.drafter.wire import DraftResult
from hilm_vllm.errors import (Aborted, FailedPrecondition, HilmError, InvalidArgument,
                              Unavailable)
from hilm_vllm.sampling import SamplingSpec, ScoredToken, Truncation, unpack_row
from hilm_vllm.server import grammar
from hilm_vllm.server.engine_session import Chunk, ResidentSessions, SessionLost
from hilm_vllm.server.caps import (DEFAULT_EXEMPT_PRINCIPALS, DEFAULT_MAX_CLIENT_SAMPLES,
                                    DEFAULT_MAX_SESSIONS_PER_CLIENT, check_caps)
from hilm_vllm.sessions import Session, SessionLimits, SessionStore
from hilm_vllm import codec
from hilm_vllm.uncertainty import UncertaintyConfig
from hilm_vllm.server.push import PullChannel

logger = logging.getLogger("hilm.drafter")

READOUT_TIMEOUT_S = 10.0  # the worker pushes before the engine's output leaves it: ms, not s


@dataclass(frozen=True)
class DrafterSettings:
    """The drafter tier's own settings (hilm-serve flags; see tier.add_cli_args)."""

    max_sessions: int = 256
    session_ttl_s: float = 600.0
    max_draft_tokens: int = 64  # largest block one Draft may ask for
    # The proposal's truncation (sampling.Truncation): at most draft_top_k entries (0 = no
    # cap) holding mass >= 1 - draft_eps; chosen by measurement (docs/architecture.md, "Proposals").
    draft_top_k: int = 64
    draft_eps: float = 1e-3
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)  # session default
    max_sessions_per_client: int = DEFAULT_MAX_SESSIONS_PER_CLIENT
    max_client_samples: int = DEFAULT_MAX_CLIENT_SAMPLES  # largest K a client may ask for
    exempt_principals: tuple[str, ...] = DEFAULT_EXEMPT_PRINCIPALS  # not per-client capped

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.session_ttl_s <= 0 or self.max_draft_tokens < 1:
            raise ValueError("max_sessions, session_ttl_s and max_draft_tokens must be positive")
        check_caps(self.max_client_samples, self.uncertainty.num_samples, self.max_sessions,
                   self.max_sessions_per_client)
        self.truncation  # noqa: B018 - raises ValueError on a bad cap or eps

    @property
    def truncation(self) -> Truncation:
        return Truncation(self.draft_top_k, self.draft_eps)


@dataclass(frozen=True)
class ModelInfo:
    vocab_size: int
    eos_token_ids: tuple[int, ...]  # every id the model stops on (empty: none)
    max_model_len: int

    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS, None when the model names none."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @classmethod
    def from_engine(cls, engine) -> ModelInfo:
        config = engine.model_config
        return cls(config.get_vocab_size(), codec.eos_token_ids(config, engine.tokenizer),
                   config.max_model_len)


@dataclass
class DrafterSession:
    tokens: list[int]  # prompt + decided tokens + provisional drafts
    prompt_len: int
    spec: SamplingSpec  # the request's sampling transform (q is it, then the truncation)
    seed: int
    seeded: bool  # the client gave a seed (else `seed` is a random one of this session)
    uncertainty: UncertaintyConfig
    limit: int  # most tokens the session may hold
    # vLLM's min_tokens: these ids (EOS and the request's stop ids) are masked in q at every
    # position before ban_until (absolute: prompt length + min_tokens)
    ban: tuple[int, ...] = ()
    ban_until: int = 0
    logprobs: int = -1  # >= 0: each drafted token's raw logprob and this many top tokens
    drafts: int = 0  # Draft calls so far (unique request keys)
    # The Draft running now (its engine part), so that a Draft that supersedes it or the
    # session's close can end it from here: the client then needs no gRPC cancel.
    running: asyncio.Task | None = field(default=None, repr=False, compare=False)


def drafted_tokens(readout: dict) -> list[ScoredToken]:
    """The worker's readout (see processor.Draft.readout) -> ScoredTokens."""
    return [ScoredToken(t, u, *unpack_row(i, w),
                        None if lp is None else codec.logprob_from_dict(lp))
            for t, u, i, w, lp in zip(readout["tokens"], readout["u"], readout["ids"],
                                      readout["probs"],
                                      readout.get("logprobs") or [None] * len(readout["tokens"]))]


def engine_timings(output) -> tuple[float, float]:
    """(queue_ms, forward_ms) from vLLM's request stats, when the engine logs them."""
    stats = getattr(output, "metrics", None)
    if stats is None or not getattr(stats, "scheduled_ts", 0):
        return 0.0, 0.0
    return ((stats.scheduled_ts - stats.queued_ts) * 1e3,
            (stats.last_token_ts - stats.scheduled_ts) * 1e3)


class _Gather:
    """The entries of one draft as they arrive; complete once the engine's token count is
    known and every index below it has arrived (a forced stop counts)."""

    def __init__(self):
        self.entries: dict[int, tuple] = {}
        self.need: int | None = None
        self.ready = asyncio.Event()

    def add(self, entry: tuple) -> None:
        self.entries[int(entry[1])] = entry
        self._check()

    def _check(self) -> None:
        if self.need is not None and all(i in self.entries for i in range(self.need)):
            self.ready.set()

    async def wait(self, n: int, timeout: float) -> dict:
        self.need = n
        self._check()
        await asyncio.wait_for(self.ready.wait(), timeout)
        return readout_of([self.entries[i] for i in range(n)])


class DraftResults:
    """API side of the drafter's push channel: entries by draft key, for the keys awaited."""

    def __init__(self):

        self.channel = PullChannel(self._on_entries)
        self._waiting: dict[str, _Gather] = {}

    def expect(self, key: str) -> _Gather:
        """Register before submitting the request: entries may arrive before its output."""
        gather = self._waiting[key] = _Gather()
        metrics.WAITING.set(len(self._waiting))
        return gather

    def forget(self, key: str) -> None:
        self._waiting.pop(key, None)
        metrics.WAITING.set(len(self._waiting))

    def _on_entries(self, frame: list) -> None:
        """One step of the worker: [records it holds, entries]."""
        records, entries = frame
        metrics.WORKER_RECORDS.set(int(records))
        for key, index, token, u, ids, probs, logprob in entries:
            if not (isinstance(key, str) and isinstance(ids, bytes) and isinstance(probs, bytes)
                    and isinstance(index, int) and isinstance(token, int)
                    and (logprob is None or isinstance(logprob, list))):
                raise ValueError("malformed draft entry")
            if (gather := self._waiting.get(key)) is not None:
                gather.add((key, index, token, float(u), ids, probs, logprob))

    def __len__(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        self.channel.close()


class Drafter:
    def __init__(self, engine, info: ModelInfo, settings: DrafterSettings,
                 store: SessionStore[DrafterSession] | None = None,
                 results: DraftResults | None = None):
        self.engine, self.info, self.settings = engine, info, settings
        if store is None:
            store = SessionStore(SessionLimits(settings.max_sessions, settings.session_ttl_s,
                                               settings.max_sessions_per_client,
                                               settings.exempt_principals))
        # Each session's engine request (server/engine_session.py), closed with the session.
        self.resident = ResidentSessions.of(engine)
        store.on_drop = lambda session: self.resident.drop(session.id)
        self.sessions = store
        self.results = results  # the push channel (set by the tier once the engine is up)

    # ---- validation -------------------------------------------------------------------------
    def check_ids(self, ids: list[int], what: str) -> None:
        codec.check_token_ids(ids, self.info.vocab_size, what)

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
             uncertainty: UncertaintyConfig | None, max_tokens: int, min_tokens: int = 0,
             stop_token_ids: Sequence[int] = (), logprobs: int | None = None
             ) -> Session[DrafterSession]:
        """A session on `prompt`. With `min_tokens`, as vLLM: the model's EOS ids and
        `stop_token_ids` are never drafted before the session holds prompt + min_tokens
        tokens (they are masked in q, which is what the verifiers compare with)."""
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
        if min_tokens < 0:
            raise InvalidArgument(f"min_tokens must be >= 0, got {min_tokens}")
        if max_tokens and min_tokens > max_tokens:
            raise InvalidArgument(f"min_tokens ({min_tokens}) must be <= max_tokens "
                                  f"({max_tokens})")
        codec.check_stop_token_ids(stop_token_ids, self.info.vocab_size)
        limit = self.info.max_model_len
        if max_tokens:
            limit = min(limit, len(ids) + max_tokens)
        ban = tuple(dict.fromkeys([*self.info.eos_token_ids, *stop_token_ids]))
        spec = grammar.for_session(spec, self.engine, ban)
        ban_until = len(ids) + min_tokens if min_tokens and ban else 0
        seeded = spec.seed is not None
        seed = spec.seed if seeded else secrets.randbits(63)
        state = DrafterSession(list(ids), len(ids), spec, seed, seeded,
                               uncertainty or self.settings.uncertainty, limit, ban, ban_until,
                               -1 if logprobs is None else logprobs)
        session = self.sessions.open(owner, state)
        metrics.SESSIONS.set(len(self.sessions))
        return session

    async def draft(self, owner: str, sid: str, position: int, max_tokens: int,
                    stop_uncertainty: float | None = None, rollback_to: int | None = None,
                    append: list[int] | tuple[int, ...] = ()) -> DraftResult:
        """Draft up to `max_tokens` after first cutting the session back to `rollback_to` (if
        given) and appending `append`. `position` is where the client believes the session is
        before that (as in Verify); 0 with `rollback_to` means "not known" (the client
        cancelled a Draft and cannot tell whether it went through): any length >= rollback_to
        is then fine. The session changes only if everything checks out (then it holds the
        drafts too)."""
        if not 1 <= max_tokens <= self.settings.max_draft_tokens:
            raise InvalidArgument(f"max_tokens must be in [1, {self.settings.max_draft_tokens}] "
                                  f"(--max-draft-tokens), got {max_tokens}")
        if stop_uncertainty is not None and math.isnan(stop_uncertainty):
            raise InvalidArgument("stop_uncertainty is NaN: send a bound in [0, 1] or leave it "
                                  "unset")
        append = list(append)
        self.check_ids(append, "appended")
        session = self.sessions.get(sid, owner)
        if position == 0 and rollback_to is not None:
            # "Not known": the client dropped the Draft it had in flight (a draft-ahead the
            # round rejected) and does not wait for it. End that one here, now.
            self.supersede(session)
        async with session.lock:
            state = session.state
            if not (position == 0 and rollback_to is not None):
                self.check_position(session, position)
            base = position if rollback_to is None else rollback_to
            self.check_rollback(session, base)
            if base + len(append) > state.limit:
                raise InvalidArgument(
                    f"appending {len(append)} tokens at position {base} would exceed the "
                    f"session's limit of {state.limit} (prompt + max_tokens, or max-model-len)")
            room = state.limit - base - len(append)
            if room <= 0:
                raise InvalidArgument(
                    f"session {sid} holds {base + len(append)} tokens, its limit (prompt + "
                    f"max_tokens, or max-model-len): nothing is left to draft; close it")
            before = list(state.tokens)  # restored if the draft fails: nothing half-applied
            metrics.ROLLED_BACK.inc(max(0, len(state.tokens) - base))
            del state.tokens[base:]
            state.tokens += append
            t0 = time.perf_counter()
            task = asyncio.ensure_future(self._draft(session, min(max_tokens, room),
                                                     stop_uncertainty))
            state.running = task
            try:
                result = await task
            except HilmError:
                state.tokens[:] = before  # a failed Draft changes nothing
                raise
            except asyncio.CancelledError:
                state.tokens[:] = before  # nor does a cancelled or superseded one
                if asyncio.current_task().cancelling():
                    raise  # this call itself was cancelled (the client hung up)
                raise Aborted(f"this Draft on session {sid} was superseded (a newer Draft "
                              f"with position 0 and rollback_to, or CloseSession, arrived "
                              f"while it ran): it drafted nothing") from None
            finally:
                if state.running is task:
                    state.running = None
            state.tokens += [t.token_id for t in result.tokens]
            metrics.observe_draft(len(result.tokens), time.perf_counter() - t0, result.early_stop)
            return replace(result, position=len(state.tokens),
                           total_ms=(time.perf_counter() - t0) * 1e3)

    @staticmethod
    def check_rollback(session: Session[DrafterSession], position: int) -> None:
        held = len(session.state.tokens)
        if position > held:
            raise FailedPrecondition(
                f"cannot roll session {session.id} forward: it is at position {held}, "
                f"asked for {position}; use Append to add tokens")
        if position < 1:
            raise InvalidArgument(f"position must be >= 1 (a context needs a token), "
                                  f"got {position}")

    async def rollback(self, owner: str, sid: str, position: int) -> int:
        session = self.sessions.get(sid, owner)
        async with session.lock:
            self.check_rollback(session, position)
            del session.state.tokens[position:]
            return position

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

    @staticmethod
    def supersede(session: Session[DrafterSession]) -> None:
        """End the session's running Draft: it answers ABORTED, having changed nothing (its
        rollback and append are undone before the superseding call runs). Clients drop a
        Draft this way rather than cancel it: grpc.aio leaks native memory for each call
        cancelled in flight (grpc/grpc#43360, ~1 KB a call on the client)."""
        if session.state.running is not None:
            session.state.running.cancel()

    def close(self, owner: str, sid: str) -> None:
        self.supersede(self.sessions.get(sid, owner))
        self.sessions.close(sid, owner)
        metrics.SESSIONS.set(len(self.sessions))

    # ---- the engine ---------------------------------------------------------------------------
    def sampling_params(self, session: Session[DrafterSession], key: str, n: int,
                        stop_uncertainty: float | None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        state = session.state
        position = len(state.tokens)
        stop_token, stop_ids = self.info.eos_token_id, []
        if stop_uncertainty is not None and stop_token is None:
            stop_token, stop_ids = 0, [0]  # no EOS: make token 0 a stop token for this draft
        options = DraftOptions(key=key, seed=state.seed, base=position,
                               uncertainty=state.uncertainty, stop_uncertainty=stop_uncertainty,
                               stop_token=-1 if stop_uncertainty is None else stop_token,
                               spec=state.spec, truncation=self.settings.truncation,
                               ban=state.ban if position < state.ban_until else (),
                               ban_until=state.ban_until if position < state.ban_until else 0,
                               logprobs=state.logprobs, session=session.id)
        # The processor draws every token from q (seeded by the session and the position) and
        # forces it: vLLM's sampler only has to keep greedy rows greedy, so it gets no top-k,
        # top-p or seed to work on.
        return SamplingParams(temperature=state.spec.temperature, max_tokens=n,
                              stop_token_ids=stop_ids, detokenize=False,
                              output_kind=RequestOutputKind.DELTA,
                              extra_args={DRAFT_ARG: options.to_extra_args()})

    async def _draft(self, session: Session[DrafterSession], n: int,
                     stop_uncertainty: float | None) -> DraftResult:
        from vllm.exceptions import VLLMClientError

        state = session.state
        state.drafts += 1
        key = f"{session.id}-{state.drafts}"
        params = self.sampling_params(session, key, n, stop_uncertainty)
        if self.results is None:
            raise Unavailable("the drafter's result channel is not up yet: retry when health "
                              "reports SERVING")
        gather = self.results.expect(key)
        context = list(state.tokens)
        try:
            # One chunk of the session's engine request: the engine is handed what it does not
            # hold (the router's correction and other tiers' tokens; it cuts back the drafts
            # that were not kept), and the context's last token is always computed again,
            # since its row gives the first draft token.
            try:
                chunk = await self.resident.get(session.id).run(context, params,
                                                                len(context) - 1)
            except SessionLost:  # evicted or aborted under us: once more, on a new request
                chunk = await self.resident.reopen(session.id).run(context, params,
                                                                   len(context) - 1)
            metrics.ENGINE_TOKENS_SENT.inc(chunk.sent)
            tokens = list(chunk.token_ids)
            try:
                readout = await gather.wait(len(tokens), READOUT_TIMEOUT_S)
            except TimeoutError:
                raise HilmError(f"draft {key}: the engine returned {len(tokens)} tokens but the "
                                f"uncertainty processor's results did not arrive within "
                                f"{READOUT_TIMEOUT_S:g} s: is the drafter's worker hook "
                                f"installed?") from None
        except (ValueError, VLLMClientError) as e:  # vLLM's request validation
            raise InvalidArgument(f"the drafter's engine refused the draft: {e}") from e
        except (HilmError, asyncio.CancelledError):
            raise
        except Exception as e:  # the engine died or failed: not the client's fault
            logger.exception("draft %s failed", key)
            raise Unavailable(f"the drafter's engine failed this draft ({type(e).__name__}: "
                              f"{e}); retry, or reopen the session if it persists") from e
        finally:
            # Nothing is left behind: this process forgets the key, and the worker drops its
            # record when the request leaves the batch (finished or aborted by generate()).
            self.results.forget(key)
        return self._result(chunk, readout, key)

    @staticmethod
    def _result(chunk: Chunk, readout: dict, key: str) -> DraftResult:
        engine_tokens = list(chunk.token_ids)
        if engine_tokens[:len(readout["tokens"])] != readout["tokens"]:
            raise HilmError(f"draft {key}: processor and engine disagree on the tokens: the "
                            f"processor no longer matches this vLLM's sampler")
        queue_ms, forward_ms = engine_timings(chunk.output)
        return DraftResult(drafted_tokens(readout), 0, readout["forced_stop"] is not None,
                           queue_ms, forward_ms)
