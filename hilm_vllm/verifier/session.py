"""A verifier session: the token history this tier has seen, its rules, and its last reply.

Pure bookkeeping and validation, no engine calls: `core.Verifier` checks a call here, runs it on
the engine, then records the outcome with `advance`. The history is the prompt plus every
appended, accepted and next token, so rollback is implicit: rejected drafts never enter it.
For a retry the session keeps only the last call's digest (`VerifyCall.digest`) and its reply,
not the call's draft distributions. `check_block` validates the distributions with numpy; the
verifier runs it off the event loop when a block is large (core.Verifier.verify).
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hilm_vllm.codec import check_token_ids
from hilm_vllm.errors import FailedPrecondition, InvalidArgument
from hilm_vllm.sampling import SamplingSpec, ScoredToken, TokenLogprob
from hilm_vllm.seeds import Stream, derive_seed
from hilm_vllm.uncertainty import UncertaintyConfig

Dist = tuple[tuple[int, ...], tuple[float, ...]]  # a sparse distribution: (token ids, probs)


@dataclass(frozen=True)
class VerifyCall:
    """One Verify request in domain terms; equal calls are retries of each other."""

    position: int  # where the client believes the session is
    append: tuple[int, ...]  # tokens this tier has not seen, kept without verification
    draft: tuple[int, ...]
    dists: tuple[Dist, ...]  # one per draft token
    want_target_probs: bool = False
    want_emitted: bool = False  # fill VerifyReply.emitted
    # How emitted uncertainties are measured; None = the tier's default (VerifierSettings).
    uncertainty: UncertaintyConfig | None = None
    rollback_to: int | None = None  # cut the context to this length first (overruled tokens)
    logprobs: int | None = None  # fill VerifyReply.logprobs with this many top tokens each

    @functools.cached_property
    def digest(self) -> bytes:
        """A 16-byte digest of every field: equal calls (retries) have equal digests."""
        h = hashlib.blake2b(digest_size=16)
        u = self.uncertainty
        h.update(repr((self.position, self.rollback_to, self.logprobs, self.want_target_probs,
                       self.want_emitted, None if u is None else (
                           u.gate.value, u.num_samples, u.theta_max, u.perturbation.value),
                       len(self.append), len(self.draft), len(self.dists))).encode())
        h.update(np.asarray(self.append, "<i8").tobytes())
        h.update(np.asarray(self.draft, "<i8").tobytes())
        for ids, probs in self.dists:
            h.update(len(ids).to_bytes(4, "little"))
            h.update(np.asarray(ids, "<i8").tobytes())
            h.update(np.asarray(probs, "<f8").tobytes())
        return h.digest()

    @property
    def support(self) -> int:
        """Entries over all draft distributions: what validating the call costs."""
        return sum(len(ids) for ids, _ in self.dists)


@dataclass(frozen=True)
class Timings:
    queue_ms: float  # in the engine but not in a forward step of this request (scheduler, IPC)
    forward_ms: float  # the engine step(s) that computed the request, verification included
    total_ms: float  # from receipt to reply


@dataclass(frozen=True)
class VerifyReply:
    num_accepted: int
    next_token: int  # the recovered (m < n) or the bonus (m = n) token
    position: int  # base + len(append) + m + 1 (base: rollback_to, else position)
    target_probs: tuple[float, ...]  # p_i(x_i), empty unless asked
    timings: Timings
    # When asked: the m + 1 emitted tokens (accepted drafts, then next_token), each with the
    # verifier's sparse p at its position and its uncertainty; a next tier can verify them as
    # a draft with q = p and stay exact.
    emitted: tuple[ScoredToken, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()  # m + 1 entries, when asked (VerifyCall.logprobs)


@dataclass(frozen=True)
class SessionLimits:
    """The bounds of one session, fixed when it opens."""

    vocab_size: int
    max_model_len: int  # the engine's: context + draft + the next token must fit
    max_block: int  # draft tokens per Verify
    max_new_tokens: int | None  # tokens the session may add to its prompt; None = no bound
    # vLLM's min_tokens: the stop tokens have p = 0 until the session has added this many
    min_tokens: int = 0
    stop_ids: tuple[int, ...] = ()  # the model's EOS ids and the request's stop_token_ids


@dataclass
class VerifierSession:
    tokens: list[int]  # the prompt, then every token the session has kept
    prompt_len: int
    spec: SamplingSpec
    limits: SessionLimits
    last: tuple[bytes, VerifyReply] | None = None  # the last call's digest, and its reply
    # Seeds the perturbation noise of emitted uncertainties per absolute position, as the
    # drafter does: the session's seed when it has one, else a random one fixed per session.
    noise_seed: int = field(default_factory=lambda: secrets.randbits(63))

    def __post_init__(self) -> None:
        if self.spec.seed is not None:
            self.noise_seed = self.spec.seed

    @property
    def position(self) -> int:
        return len(self.tokens)

    def replay(self, call: VerifyCall) -> VerifyReply | None:
        """The reply already given to this exact call (a retry), if it was the last one."""
        return self.last[1] if self.last is not None and self.last[0] == call.digest else None

    def check(self, call: VerifyCall, block_checked: bool = False) -> None:
        """Raise InvalidArgument / FailedPrecondition saying what to fix; None if valid.
        `block_checked`: `check_block` already passed (the verifier ran it in a thread)."""
        if not block_checked:
            check_block(call, self.limits)
        if call.position != self.position:
            raise FailedPrecondition(
                f"session is at position {self.position}, the request says {call.position}: "
                f"resend with position={self.position} (and the tokens after it in append)")
        if call.rollback_to is not None and not self.prompt_len <= call.rollback_to <= self.position:
            raise InvalidArgument(
                f"rollback_to {call.rollback_to} is outside [{self.prompt_len}, {self.position}] "
                f"(the prompt cannot be cut; the session holds {self.position} tokens)")
        check_length(self, call)

    def ban_rows(self, call: VerifyCall) -> int:
        """How many of the call's n + 1 rows predict a token before min_tokens (masked)."""
        first = self.base(call) + len(call.append)  # absolute position of draft token 0
        return max(0, min(len(call.draft) + 1,
                          self.prompt_len + self.limits.min_tokens - first))

    def base(self, call: VerifyCall) -> int:
        """The length of the context this call builds on."""
        return self.position if call.rollback_to is None else call.rollback_to

    def context(self, call: VerifyCall) -> list[int]:
        return self.tokens[:self.base(call)]

    def advance(self, call: VerifyCall, reply: VerifyReply) -> None:
        del self.tokens[self.base(call):]
        self.tokens += [*call.append, *call.draft[:reply.num_accepted], reply.next_token]
        self.last = (call.digest, reply)

    def seeds(self, position: int) -> tuple[int, int]:
        """(worker draws, engine sample) seeds for a call at `position`, reproducible when the
        session has a seed. Two independent streams: the accept uniforms and residual draw must
        not be correlated with the engine's bonus sample."""
        if self.spec.seed is None:
            return secrets.randbits(63), secrets.randbits(63)
        return (derive_seed(self.spec.seed, position, Stream.VERIFY_DRAWS),
                derive_seed(self.spec.seed, position, Stream.VERIFY_SAMPLE))


def check_block(call: VerifyCall, limits: SessionLimits) -> None:
    """Checks of the call alone: shapes, ids, and each draft distribution."""
    n = len(call.draft)
    if len(call.dists) != n:
        raise InvalidArgument(f"{n} draft tokens but {len(call.dists)} draft distributions: "
                              f"send one distribution per draft token")
    if n > limits.max_block:
        raise InvalidArgument(f"draft block of {n} tokens is over this tier's limit of "
                              f"{limits.max_block}: split it into smaller blocks")
    check_token_ids(call.append, limits.vocab_size, "append_token_ids")
    check_token_ids(call.draft, limits.vocab_size, "draft_token_ids")
    for i, ((ids, probs), token) in enumerate(zip(call.dists, call.draft)):
        if problem := dist_problem(ids, probs, limits.vocab_size, token):
            raise InvalidArgument(f"draft_dists[{i}]: {problem}; send the exact distribution "
                                  f"the drafter sampled token {token} from")


def dist_problem(ids: Sequence[int], probs: Sequence[float], vocab_size: int, token: int,
                 eps: float = 1e-3) -> str | None:
    """Why (ids, probs) is not a valid draft distribution for `token`, or None if it is
    (numpy: a full-vocabulary row is 100k+ entries)."""
    if len(ids) != len(probs):
        return f"distribution has {len(ids)} token ids but {len(probs)} probabilities"
    if not len(ids):
        return "distribution is empty"
    ids_a = np.asarray(ids, dtype=np.int64)
    probs_a = np.asarray(probs, dtype=np.float64)
    if ids_a.min() < 0 or ids_a.max() >= vocab_size:
        return f"distribution has a token id outside the vocabulary [0, {vocab_size})"
    if len(np.unique(ids_a)) != len(ids_a):
        return "distribution lists a token id twice"
    if not np.all(probs_a >= 0):  # also catches NaN
        return "distribution has a negative or NaN probability"
    total = float(probs_a.sum())
    if total > 1 + eps or total < 1 - eps:
        return f"probabilities sum to {total:.6f}, not 1"
    at = np.flatnonzero(ids_a == token)
    if not len(at):
        return f"draft token {token} is missing from its own distribution"
    if probs_a[at[0]] <= 0:
        return f"draft token {token} has probability 0 in its own distribution"
    return None


def check_length(session: VerifierSession, call: VerifyCall) -> None:
    """The context after this call (plus the next token) must fit the engine and the session."""
    added = len(call.append) + len(call.draft) + 1
    total = session.base(call) + added
    if total > session.limits.max_model_len:
        raise InvalidArgument(
            f"context would reach {total} tokens ({session.base(call)} held + {added - 1} "
            f"appended/draft + 1 next), over max-model-len {session.limits.max_model_len}: "
            f"send fewer tokens or end the session")
    bound = session.limits.max_new_tokens
    new_tokens = total - session.prompt_len
    if bound is not None and new_tokens > bound:
        raise InvalidArgument(f"session would hold {new_tokens} new tokens, over its max_tokens "
                              f"{bound}: send fewer tokens or end the session")
