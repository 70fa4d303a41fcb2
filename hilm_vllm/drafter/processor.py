"""Same-step uncertainty and the drafter's own draw, inside vLLM's sampler.

`UncertaintyProcessor` is a V1 logits processor (vLLM 0.32, V1 model runner). It returns False
from `is_argmax_invariant()`, so the sampler hands it the RAW float32 logits of every row, after
the allowed-token mask, bad words and the built-in min-tokens / logit-bias processors and before
penalties, temperature, min-p and top-k/top-p. A request opts in with

    SamplingParams(..., extra_args={"hilm_draft": DraftOptions(...).to_extra_args()})

and, once per engine step, for all drafter rows of the step together, the processor
  1. builds each row's proposal q: the request's temperature / top-k / top-p applied to the raw
     row (`sampling.processed_probs_batch`), then truncated (`sampling.truncate`: the smallest
     set holding mass >= 1 - eps, at most `cap` entries, float16 weights),
  2. draws the token from that q itself (inverse CDF, one uniform per position derived from
     (session seed, absolute position), the same on every device) and forces it: every other
     logit of the row becomes -inf, so whatever vLLM's sampler does (its batch-dependent
     top-k/top-p kernels on GPU included) it emits exactly that token. q is therefore the law
     the token was drawn from by construction, not by matching vLLM's sampler bit for bit;
  3. measures u of the drawn token (`uncertainty.perturbed_disagreement`, or a token-free gate).
The worker's step hook (`hilm_vllm.drafter.worker.DraftHook`, after the sampler) checks the
engine emitted the forced token, finishes the positions of rows whose sample was kept
(`collect_step`) and pushes them to the API process at once (`hilm_vllm.server.push`): no RPC
per Draft. Only the truncated rows (c entries each) leave the device.

Early stop. With `stop_uncertainty` set, a position whose previous token's u exceeds the bound
is forced to the stop token instead, vLLM finishes the request, and the reader drops that forced
token. Cost: the one forward pass of that step, and no extra round trips.

vLLM's own penalties and min-p (its sampler applies them after this processor, so q would not
include them) are refused for drafter requests, and so is n > 1 (rows are keyed by request).
The request's sampler transforms travel in `DraftOptions.spec.penalties` instead and are part of
q (`sampling.processed_probs_batch`, with each row's context: the request's tokens before the
position, earlier draft tokens included).

Structured outputs: a draft whose spec carries a constraint has each row masked with its
grammar's bitmask first (`server/grammar.py`, the session's tracker after the tokens before
the position), so the drafter drafts inside the grammar and q, u and the raw logprobs see the
mask, as vLLM's sampler would.

All state lives in the worker process (`STORE`). A record lives while its request is in the
batch and not finished: it is dropped when its last token is pushed, or when vLLM removes the
request from the batch (finished, aborted, preempted: a preempted request re-attaches and goes on
from its live output list). Without a push channel (in-process engines, tests) finished drafts
are kept, bounded, for `collective_rpc("hilm_pop_draft", key)`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import torch
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from hilm_vllm import codec
from hilm_vllm.sampling import (SamplingSpec, Truncation, apply_bitmask, draw, pack_row,
                                processed_probs_batch, seed_uniform, token_logprobs, truncate)
from hilm_vllm.seeds import Stream, derive_seed
from hilm_vllm.server import memtrace
from hilm_vllm.server.grammar import RowGrammars
from hilm_vllm.uncertainty import (TOKEN_FREE_GATES, UncertaintyConfig, noise,
                                   perturbed_disagreement)

DRAFT_ARG = "hilm_draft"  # SamplingParams.extra_args key that turns the processor on
STORE_CAPACITY = 4096  # live drafts, or finished ones kept unread without a push channel
FORCED_STOP = -1  # the token field of the entry that marks a forced (dropped) stop token


@dataclass(frozen=True)
class DraftOptions:
    """What a drafter request tells the processor (travels in extra_args as a plain dict)."""

    key: str  # unique per draft request; the reader pops by it
    seed: int  # session seed; noise for absolute position t: derive_seed(seed, t, Stream.PERTURBATION)
    base: int  # absolute position of the first drafted token (= prompt length)
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    stop_uncertainty: float | None = None  # end the draft after a token with u above this
    stop_token: int = -1  # token forced to end the draft early (a stop token of the request)
    # What q is: the request's sampling transform, then the drafter's truncation. vLLM's own
    # SamplingParams of the request carry neither (the processor forces the token it draws).
    spec: SamplingSpec = field(default_factory=SamplingSpec)
    truncation: Truncation = field(default_factory=Truncation)
    # vLLM's min_tokens: `ban` (the stop ids) is masked in the raw logits of every position
    # before `ban_until` (absolute), as vLLM's min-tokens processor does before the sampler
    ban: tuple[int, ...] = ()
    ban_until: int = 0
    logprobs: int = -1  # >= 0: each token's raw logprob (before any mask but the grammar's)
    # and this many top
    session: str = ""  # the drafter session's id: its grammar state is kept under it

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"{DRAFT_ARG}.key must be a non-empty string")
        if self.seed < 0 or self.base < 0:
            raise ValueError(f"{DRAFT_ARG}.seed and .base must be >= 0")
        if self.stop_uncertainty is not None:
            if not math.isfinite(self.stop_uncertainty):
                raise ValueError(f"{DRAFT_ARG}.stop_uncertainty must be finite")
            if self.stop_token < 0:
                raise ValueError(f"{DRAFT_ARG}.stop_token is needed with stop_uncertainty")

    def to_extra_args(self) -> dict:
        return asdict(self) | {"uncertainty": codec.uncertainty_to_dict(self.uncertainty),
                               "spec": codec.sampling_to_dict(self.spec),
                               "truncation": [self.truncation.cap, self.truncation.eps]}

    @classmethod
    def from_extra_args(cls, d: dict) -> DraftOptions:
        try:
            cap, eps = d.get("truncation", (Truncation.cap, Truncation.eps))
            return cls(key=d["key"], seed=int(d["seed"]), base=int(d["base"]),
                       uncertainty=codec.uncertainty_from_dict(d.get("uncertainty")),
                       stop_uncertainty=d.get("stop_uncertainty"),
                       stop_token=int(d.get("stop_token", -1)),
                       spec=codec.sampling_from_dict(d["spec"]) if "spec" in d else SamplingSpec(),
                       truncation=Truncation(int(cap), float(eps)),
                       ban=tuple(int(t) for t in d.get("ban", ())),
                       ban_until=int(d.get("ban_until", 0)),
                       logprobs=int(d.get("logprobs", -1)),
                       session=str(d.get("session", "")))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed extra_args[{DRAFT_ARG!r}]: {e!r}") from e


def draft_options(params) -> DraftOptions | None:
    """The request's DraftOptions, or None when it did not opt in."""
    d = (params.extra_args or {}).get(DRAFT_ARG)
    return None if d is None else DraftOptions.from_extra_args(d)


def unsupported_params(params) -> str | None:
    """Why q could not be reproduced for these vLLM SamplingParams, or None."""
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
        return "penalties are applied after the drafter's processor, so q would not be exact"
    if params.min_p:
        return "min_p is applied after the drafter's processor, so q would not be exact"
    if params.n != 1:
        return "n must be 1 (one draft per request)"
    return None


@dataclass(frozen=True)
class Position:
    """One drafted position, complete when the processor has run: the token it drew and
    forced, its u, and its truncated q packed for the wire (`sampling.pack_row`)."""

    token: int
    u: float
    ids: bytes  # <i4
    weights: bytes  # <f2
    logprob: list | None = None  # codec.logprob_to_dict of its TokenLogprob, when asked


@dataclass(frozen=True)
class Stops:
    """When vLLM's scheduler ends the request: the worker does not know, so it mirrors it."""

    max_tokens: int
    token_ids: frozenset[int]  # stop_token_ids, plus EOS unless ignore_eos
    min_tokens: int = 0

    @classmethod
    def of(cls, params) -> Stops:
        ids = set(params.stop_token_ids or ())
        eos = getattr(params, "eos_token_id", None)
        if eos is not None and not params.ignore_eos:
            ids.add(eos)
        return cls(params.max_tokens or 1 << 30, frozenset(ids), params.min_tokens or 0)

    def last(self, index: int, token: int) -> bool:
        """Is the token at output index `index` the request's last?"""
        n = index + 1
        return n >= self.max_tokens or (n >= self.min_tokens and token in self.token_ids)


# One finished position, as pushed: (key, index, token, u, ids <i4 bytes, weights <f2 bytes,
# logprob [logprob, top ids, top logprobs] or None); a forced stop is
# (key, index, FORCED_STOP, 0.0, b"", b"", None).
Entry = tuple[str, int, int, float, bytes, bytes, list | None]


@dataclass
class Draft:
    options: DraftOptions
    output_ids: list[int]  # vLLM's live output list of the request
    stops: Stops = Stops(1 << 30, frozenset())
    positions: dict[int, Position] = field(default_factory=dict)
    forced_stop: int | None = None  # index of the forced (dropped) token
    done: bool = False
    kept: list[Entry] | None = None  # entries, when kept for hilm_pop_draft (no push channel)
    prompt_ids: list[int] = field(default_factory=list)  # the context before the first draft

    def readout(self) -> dict:
        """The kept entries as plain types (what `collective_rpc("hilm_pop_draft")` returns)."""
        return readout_of(self.kept or [])


def readout_of(entries: list[Entry]) -> dict:
    """A draft's entries, in order -> {"tokens", "forced_stop", "u", "ids", "probs"}."""
    entries = sorted(entries, key=lambda e: e[1])
    forced = next((e[1] for e in entries if e[2] == FORCED_STOP), None)
    done = [e for e in entries if e[2] != FORCED_STOP]
    return {"tokens": [e[2] for e in done], "forced_stop": forced, "u": [e[3] for e in done],
            "ids": [e[4] for e in done], "probs": [e[5] for e in done],
            "logprobs": [e[6] if len(e) > 6 else None for e in done]}


class DraftStore:
    """Live drafts by key in the worker process, and (without a push channel) finished ones
    until they are popped; bounded, oldest dropped first."""

    def __init__(self, capacity: int = STORE_CAPACITY):
        self.capacity = capacity
        self._drafts: OrderedDict[str, Draft] = OrderedDict()
        self.finished: OrderedDict[str, Draft] = OrderedDict()
        self._lock = threading.Lock()  # rpc reader and sampler may be different threads
        self.keep_finished = True  # False once a push channel delivers the results

    def attach(self, options: DraftOptions, output_ids: list[int], stops: Stops,
               prompt_ids: list[int] | None = None) -> Draft:
        """Start a draft, or re-attach one whose request was re-added (preemption)."""
        with self._lock:
            draft = self._drafts.get(options.key)
            if draft is None:
                draft = self._drafts[options.key] = Draft(
                    options, output_ids, stops, kept=[] if self.keep_finished else None)
                while len(self._drafts) > self.capacity:
                    self._drafts.popitem(last=False)
            draft.output_ids = output_ids
            if prompt_ids is not None:  # vLLM's list (replaced, not changed, by a new chunk)
                draft.prompt_ids = prompt_ids
            return draft

    def drop(self, draft: Draft | None) -> None:
        """Forget a live draft (its request left the batch, or its last token was pushed)."""
        if draft is None:
            return
        with self._lock:
            if self._drafts.get(draft.options.key) is not draft:
                return  # dropped already (done, then removed from the batch)
            del self._drafts[draft.options.key]
            if draft.done and draft.kept is not None:
                self.finished[draft.options.key] = draft
                while len(self.finished) > self.capacity:
                    self.finished.popitem(last=False)

    def pop(self, key: str) -> Draft | None:
        """A finished draft kept for `hilm_pop_draft`, removed."""
        with self._lock:
            return self.finished.pop(key, None)

    def __len__(self) -> int:
        return len(self._drafts) + len(self.finished)


STORE = DraftStore()
GRAMMARS: RowGrammars | None = None  # structured outputs' masks (set by the processor)
STATS = {"apply_s": 0.0, "apply_calls": 0, "rows": 0}  # processor cost, for the benchmark


def observe_rows(logits: torch.Tensor, active: list[tuple[int, Draft, int]]
                 ) -> list[Position]:
    """The step's work for every drafter row at once (see the module docstring): logits
    [num_rows, V] raw, `active` (batch row, draft, output index) -> one Position each. Forces
    each row to its drawn token, in place. Everything runs on the logits' device; only the
    truncated rows, the tokens and the u values come to the host."""
    rows = torch.tensor([r for r, _, _ in active], dtype=torch.long, device=logits.device)
    raw = logits.index_select(0, rows).float()  # [B, V]
    drafts = [d for _, d, _ in active]
    constrained = [i for i, d in enumerate(drafts) if d.options.spec.structured is not None]
    if constrained:  # drafted inside the grammar: q (and raw logprobs) see its mask first
        if GRAMMARS is None:
            raise RuntimeError("a structured draft reached a processor built without a config")
        raw = apply_bitmask(raw, torch.tensor(constrained, dtype=torch.long), GRAMMARS.bitmask([
            (drafts[i].options.session or drafts[i].options.key, drafts[i].options.spec.structured,
             context_of(drafts[i], active[i][2])) for i in constrained]))
    wants_lp = [i for i, d in enumerate(drafts) if d.options.logprobs >= 0]
    # vLLM's raw logprobs are of the logits before any mask but the grammar's (vLLM masks with
    # the grammar before its sampler): keep those rows as they are now
    bare = raw.index_select(0, torch.tensor(wants_lp, dtype=torch.long, device=raw.device)
                            ) if wants_lp else None
    banned = [(i, d.options.ban) for i, (_, d, index) in enumerate(active)
              if d.options.ban and d.options.base + index < d.options.ban_until]
    if banned:  # min_tokens: the stop ids cannot be drawn yet (q and u see them masked)
        raw = ban_rows(raw, banned)
    contexts = [context_of(d, index) if d.options.spec.penalties is not None
                and d.options.spec.penalties.needs_context else None
                for _, d, index in active]
    probs = processed_probs_batch(raw, [d.options.spec for d in drafts], contexts)
    by_trunc: dict[Truncation, list[int]] = {}
    for i, d in enumerate(drafts):
        by_trunc.setdefault(d.options.truncation, []).append(i)
    ids_all: list = [None] * len(active)
    w_all: list = [None] * len(active)
    tokens = torch.empty(len(active), dtype=torch.long, device=logits.device)
    for trunc, members in by_trunc.items():
        index = torch.tensor(members, dtype=torch.long, device=logits.device)
        ids, weights = truncate(probs.index_select(0, index), trunc)  # [b, c]
        uniforms = torch.tensor([seed_uniform(derive_seed(
            drafts[i].options.seed, drafts[i].options.base + active[i][2], Stream.DRAFT_DRAW))
            for i in members], dtype=torch.float64)
        picked = ids.gather(1, draw(weights, uniforms)[:, None]).squeeze(1)  # [b]
        tokens.index_copy_(0, index, picked)
        for j, i in enumerate(members):
            ids_all[i], w_all[i] = ids[j], weights[j]
    # Force the draws: vLLM's sampler can only emit them.
    logits.index_fill_(0, rows, -math.inf)
    logits[rows, tokens] = 0.0
    u = gate_values(raw, tokens, active)
    tokens_host = tokens.tolist()
    lps: dict[int, list] = {}
    for top in {drafts[i].options.logprobs for i in wants_lp}:
        members = [j for j, i in enumerate(wants_lp) if drafts[i].options.logprobs == top]
        index = torch.tensor(members, dtype=torch.long, device=raw.device)
        found = token_logprobs(bare.index_select(0, index),
                               [tokens_host[wants_lp[j]] for j in members], top)
        for j, t in zip(members, found):
            lps[wants_lp[j]] = codec.logprob_to_dict(t)
    out = []
    for i, (ids, weights) in enumerate(zip(ids_all, w_all)):
        packed = pack_row(ids.cpu().numpy(), weights.cpu().numpy())
        out.append(Position(tokens_host[i], u[i], *packed, lps.get(i)))
    return out


def context_of(draft: Draft, index: int) -> list[int]:
    """The session's tokens before the draft's output index `index` (what the row at that
    index sees: the context, then the draft tokens before it)."""
    return list(draft.prompt_ids[:draft.options.base]) + list(draft.output_ids[:index])


def ban_rows(raw: torch.Tensor, banned: list[tuple[int, tuple[int, ...]]]) -> torch.Tensor:
    """raw [B, V] with the ids of each (row, ids) set to -inf, in place, on raw's device."""
    rows = torch.tensor([i for i, ids in banned for _ in ids], dtype=torch.long,
                        device=raw.device)
    cols = torch.tensor([t for _, ids in banned for t in ids], dtype=torch.long,
                        device=raw.device)
    raw[rows, cols] = -math.inf
    return raw


def gate_values(raw: torch.Tensor, tokens: torch.Tensor,
                active: list[tuple[int, Draft, int]]) -> list[float]:
    """u of each drawn token: the perturbed gate for every row that asks for it in one call,
    each token-free gate in one call over its rows."""
    u = [0.0] * len(active)
    groups: dict[object, list[int]] = {}
    for i, (_, d, _) in enumerate(active):
        cfg = d.options.uncertainty
        groups.setdefault(cfg if cfg.needs_token else cfg.gate, []).append(i)
    for key, members in groups.items():
        index = torch.tensor(members, dtype=torch.long, device=raw.device)
        if isinstance(key, UncertaintyConfig):  # perturbed: noise per absolute position
            draws = [noise(key, derive_seed(active[i][1].options.seed,
                                            active[i][1].options.base + active[i][2],
                                            Stream.PERTURBATION)) for i in members]
            values = perturbed_disagreement(raw.index_select(0, index),
                                            tokens.index_select(0, index),
                                            torch.stack([t for t, _ in draws]),
                                            torch.stack([r for _, r in draws]))
        else:
            values = TOKEN_FREE_GATES[key](raw.index_select(0, index))
        for i, v in zip(members, values.tolist()):
            u[i] = float(v)
    return u


def collect_step(rows: dict[int, Draft], sampled: list[int], skip: set[int]) -> list[Entry]:
    """After the sampler: finish this step's position of every drafter row (`sampled[row]` is
    the token the engine sampled; rows in `skip` had their sample discarded, e.g. a partial
    prefill chunk) and return the entries to push. A draft whose last token this was is done
    and leaves the store."""
    out: list[tuple[Draft, Entry]] = []
    for row, draft in rows.items():
        if row in skip or row >= len(sampled):
            continue
        index = len(draft.output_ids)  # this step's token is appended after this hook
        if draft.forced_stop == index:
            out.append((draft, (draft.options.key, index, FORCED_STOP, 0.0, b"", b"", None)))
            draft.done = True
        elif (pos := draft.positions.get(index)) is not None:
            if sampled[row] != pos.token:
                raise RuntimeError(f"drafter row {row}: the engine emitted {sampled[row]}, the "
                                   f"processor drew and forced {pos.token}: the processor no "
                                   f"longer matches this vLLM's sampler")
            out.append((draft, (draft.options.key, index, pos.token, pos.u, pos.ids,
                                pos.weights, pos.logprob)))
            draft.done = draft.stops.last(index, pos.token)
    for draft, entry in out:
        if draft.kept is not None:
            draft.kept.append(entry)
        if draft.done:
            STORE.drop(draft)
    return [entry for _, entry in out]


def should_stop(draft: Draft, position: int) -> bool:
    """True when the token before `position` was more uncertain than the draft's bound."""
    bound = draft.options.stop_uncertainty
    prev = draft.positions.get(position - 1)
    return bound is not None and prev is not None and prev.u > bound


class UncertaintyProcessor(LogitsProcessor):
    """Observe-only V1 logits processor (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        if draft_options(sampling_params) is not None:
            if (why := unsupported_params(sampling_params)) is not None:
                raise VLLMValidationError(f"drafter request ({DRAFT_ARG}): {why}")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):

        global GRAMMARS
        memtrace.start_from_env("drafter-engine")
        if GRAMMARS is None:
            GRAMMARS = RowGrammars(vllm_config)
        self.rows: dict[int, Draft] = {}  # batch row -> draft

    def is_argmax_invariant(self) -> bool:
        return False  # => raw logits of all rows, before penalties and temperature

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """vLLM's order: removed, added, moved. A draft whose row goes away is dropped from
        the store (nothing is left behind by an abort)."""
        if not batch_update:
            return
        rows = self.rows
        for index in batch_update.removed:
            STORE.drop(rows.pop(index, None))
        for index, params, prompt_ids, output_ids in batch_update.added:
            STORE.drop(rows.pop(index, None))
            if (options := draft_options(params)) is not None:
                rows[index] = STORE.attach(options, output_ids, Stops.of(params), prompt_ids)
        for a, b, direction in batch_update.moved:
            a_draft, b_draft = rows.pop(a, None), rows.pop(b, None)
            if a_draft is not None:
                rows[b] = a_draft
            if direction == MoveDirectionality.SWAP and b_draft is not None:
                rows[a] = b_draft
            else:
                STORE.drop(b_draft)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:  # [num_rows, V] float32
        if not self.rows:
            return logits
        t0 = time.perf_counter()
        active = []
        for row, draft in self.rows.items():
            position = len(draft.output_ids)  # index of the token this step samples
            if should_stop(draft, position):
                draft.forced_stop = position
                logits[row].fill_(-math.inf)
                logits[row, draft.options.stop_token] = 0.0
            elif draft.forced_stop is None:
                active.append((row, draft, position))
        if active:
            for (_, draft, position), pos in zip(active, observe_rows(logits, active)):
                draft.positions[position] = pos
        STATS["apply_s"] += time.perf_counter() - t0
        STATS["apply_calls"] += 1
        STATS["rows"] += len(self.rows)
        return logits
