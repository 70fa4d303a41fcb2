"""Same-step uncertainty and exact draft distributions, observed inside vLLM's sampler.

`UncertaintyProcessor` is a V1 logits processor (vLLM 0.32, V1 model runner). It returns False
from `is_argmax_invariant()`, so the sampler hands it the RAW float32 logits of every row, after
the allowed-token mask, bad words and the built-in min-tokens / logit-bias processors and before
penalties, temperature, min-p and top-k/top-p. It never changes them, except to end a draft early
(below). A request opts in with

    SamplingParams(..., extra_args={"hilm_draft": DraftOptions(...).to_extra_args()})

and, for each position it drafts, the processor stores
  1. the K perturbed-temperature samples (or the value of a token-free gate), and
  2. q, the exact distribution the sampler draws the token from: `processed_probs` applies
     vLLM's own temperature and top-k/top-p to the same raw row, so q is bit-for-bit the
     sampler's. Its support (the nonzero entries) is kept, so q is sparse but exact.
The drafted token is not known inside `apply()`; it is read from the request's live output list
(held by reference from `BatchUpdate.added`) when the position is finished: at the next step, or
when the worker extension pops the draft (`hilm_vllm.drafter.worker`).

Early stop. With `stop_uncertainty` set, the step after token i computes u_i (token i is in the
output list by then); if u_i exceeds the bound, the processor forces this step's token to the
stop token (every other logit -inf), vLLM finishes the request, and the reader drops that
forced token. Cost: the one forward pass of the step that would have drafted token i+1, and no
extra round trips (streaming and aborting would pay per-token messages and overrun by the
pipeline depth).

Exactness needs every transform after this processor to be reproduced here: penalties and min-p
(applied later by the sampler) are therefore refused for drafter requests, and so is n > 1
(rows are keyed by request).

All state lives in the worker process (`STORE`); the worker extension reads it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from hilm_vllm.sampling import SamplingSpec, processed_probs
from hilm_vllm.uncertainty import (TOKEN_FREE_GATES, UncertaintyConfig, derive_seed,
                                   disagreement, draw_samples)

DRAFT_ARG = "hilm_draft"  # SamplingParams.extra_args key that turns the processor on
NOISE_STREAM = 1  # derive_seed stream of the perturbation noise (0 is the session's sampler)
STORE_CAPACITY = 4096  # drafts kept unread before the oldest are dropped (a reader that died)


@dataclass(frozen=True)
class DraftOptions:
    """What a drafter request tells the processor (travels in extra_args as a plain dict)."""

    key: str  # unique per draft request; the reader pops by it
    seed: int  # session seed; noise for absolute position t uses derive_seed(seed, t, 1)
    base: int  # absolute position of the first drafted token (= prompt length)
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    stop_uncertainty: float | None = None  # end the draft after a token with u above this
    stop_token: int = -1  # token forced to end the draft early (a stop token of the request)

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
        d = asdict(self)
        d["uncertainty"] = {k: getattr(v, "value", v) for k, v in d["uncertainty"].items()}
        return d

    @classmethod
    def from_extra_args(cls, d: dict) -> DraftOptions:
        try:
            return cls(key=d["key"], seed=int(d["seed"]), base=int(d["base"]),
                       uncertainty=UncertaintyConfig(**d.get("uncertainty", {})),
                       stop_uncertainty=d.get("stop_uncertainty"),
                       stop_token=int(d.get("stop_token", -1)))
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


def spec_of(params) -> SamplingSpec:
    """The sampling transform vLLM applies after this processor (greedy: vLLM zeroes top-k/p)."""
    return SamplingSpec(temperature=params.temperature, top_k=max(params.top_k, 0),
                        top_p=params.top_p)


@dataclass
class Position:
    """What was observed at one drafted position; `u` is cached once the token is known."""

    samples: torch.Tensor | None  # [K] perturbed samples (perturbed gate only)
    gate: float | None  # token-free gate value
    q: torch.Tensor  # [V] float32, dense; made sparse at readout, all positions at once
    u: float | None = None

    def finish(self, token: int) -> float:
        if self.u is None:
            self.u = self.gate if self.samples is None else disagreement(self.samples, token)
        return self.u


@dataclass
class Draft:
    options: DraftOptions
    spec: SamplingSpec
    output_ids: list[int]  # vLLM's live output list of the request
    positions: dict[int, Position] = field(default_factory=dict)
    forced_stop: int | None = None  # index of the forced (dropped) token

    def readout(self) -> dict:
        """Finished per-token results (plain types, so collective_rpc can carry them)."""
        tokens = list(self.output_ids)
        n = len(tokens) if self.forced_stop is None else self.forced_stop
        if any(i not in self.positions for i in range(n)):
            raise RuntimeError(f"draft {self.options.key}: a drafted position was not observed")
        pos = [self.positions[i] for i in range(n)]
        ids, probs = sparse_rows(torch.stack([p.q for p in pos])) if pos else ([], [])
        return {"tokens": tokens[:n], "forced_stop": self.forced_stop,
                "u": [p.finish(t) for p, t in zip(pos, tokens)],
                "ids": [i.tobytes() for i in ids], "probs": [p.tobytes() for p in probs]}


class DraftStore:
    """Drafts by key in the worker process, bounded (a reader that died leaks nothing)."""

    def __init__(self, capacity: int = STORE_CAPACITY):
        self.capacity = capacity
        self._drafts: OrderedDict[str, Draft] = OrderedDict()
        self._lock = threading.Lock()  # rpc reader and sampler may be different threads

    def attach(self, options: DraftOptions, spec: SamplingSpec, output_ids: list[int]) -> Draft:
        """Start a draft, or re-attach one whose request was re-added (preemption)."""
        with self._lock:
            draft = self._drafts.get(options.key)
            if draft is None:
                draft = self._drafts[options.key] = Draft(options, spec, output_ids)
                while len(self._drafts) > self.capacity:
                    self._drafts.popitem(last=False)
            draft.output_ids = output_ids
            return draft

    def pop(self, key: str) -> Draft | None:
        with self._lock:
            return self._drafts.pop(key, None)

    def __len__(self) -> int:
        return len(self._drafts)


STORE = DraftStore()
STATS = {"apply_s": 0.0, "apply_calls": 0, "rows": 0}  # processor cost, for the benchmark


def sparse_rows(q: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """q [n, V] -> per row (ids [S] int32, probs [S] float32) of its support (q > 0), exactly
    as `sampling.to_sparse` defines it. In numpy: torch's nonzero and boolean indexing cost
    ~10x more inside the worker (parallel kernels on bound OpenMP threads, for 8 x 2048)."""
    ids, probs = [], []
    for row in q.cpu().numpy():
        support = np.flatnonzero(row > 0).astype(np.int32)
        ids.append(support)
        probs.append(row[support])
    return ids, probs


def observe(raw: torch.Tensor, draft: Draft, position: int) -> Position:
    """raw [V] float32 logits of one drafted position -> its Position record."""
    opts, cfg = draft.options, draft.options.uncertainty
    q = processed_probs(raw[None, :], draft.spec)[0]
    if cfg.needs_token:
        seed = derive_seed(opts.seed, opts.base + position, NOISE_STREAM)
        return Position(draw_samples(raw, cfg, seed), None, q)
    return Position(None, float(TOKEN_FREE_GATES[cfg.gate](raw[None, :])[0]), q)


def should_stop(draft: Draft, position: int) -> bool:
    """True when the token before `position` was more uncertain than the draft's bound."""
    bound = draft.options.stop_uncertainty
    prev = draft.positions.get(position - 1)
    if bound is None or prev is None:
        return False
    return prev.finish(draft.output_ids[position - 1]) > bound


class UncertaintyProcessor(LogitsProcessor):
    """Observe-only V1 logits processor (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        if draft_options(sampling_params) is not None:
            if (why := unsupported_params(sampling_params)) is not None:
                raise VLLMValidationError(f"drafter request ({DRAFT_ARG}): {why}")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, Draft] = {}  # batch row -> draft

    def is_argmax_invariant(self) -> bool:
        return False  # => raw logits of all rows, before penalties and temperature

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)

    @staticmethod
    def _new_row(params, prompt_ids, output_ids) -> Draft | None:
        options = draft_options(params)
        return None if options is None else STORE.attach(options, spec_of(params), output_ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:  # [num_rows, V] float32
        if not self.rows:
            return logits
        t0 = time.perf_counter()
        for row, draft in self.rows.items():
            position = len(draft.output_ids)  # index of the token this step samples
            if should_stop(draft, position):
                draft.forced_stop = position
                logits[row].fill_(-math.inf)
                logits[row, draft.options.stop_token] = 0.0
            elif draft.forced_stop is None:
                draft.positions[position] = observe(logits[row], draft, position)
        STATS["apply_s"] += time.perf_counter() - t0
        STATS["apply_calls"] += 1
        STATS["rows"] += len(self.rows)
        return logits
