"""What crosses between the verifier's API process and vLLM's worker, both ways.

A verification request travels inside `SamplingParams.extra_args[EXTRA_ARGS_KEY]` (msgpack to the
engine core, then to the worker), so it holds only plain values; the draft distributions are
packed as compact little-endian arrays. The worker's answer comes back from
`collective_rpc("hilm_pop_verify", key)` (or the ZMQ channel, as JSON) as a plain dict. Full
vocabulary rows never travel: emitted distributions come back sparse (their nonzero entries only),
as base64 little-endian arrays. Without top-k that is still up to the whole support: ~1 MB per
emitted token for a 128k vocabulary (16 KB at most for the demo's 2048).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hilm_vllm import codec
from hilm_vllm.rejection import SparseRows
from hilm_vllm.sampling import SamplingSpec, TokenLogprob, Truncation
from hilm_vllm.uncertainty import UncertaintyConfig

EXTRA_ARGS_KEY = "hilm_verify"


@dataclass(frozen=True)
class EmitArgs:
    """Asks the worker for the emitted tokens' sparse p and uncertainty (VerifyResult.emitted)."""

    uncertainty: UncertaintyConfig
    noise_seed: int  # perturbation noise of absolute position t: derive_seed(noise_seed, t, Stream.PERTURBATION)
    # A Verify that asks for its emitted rows verifies against p truncated by this (and emits
    # exactly that law): the rows stay small and remain the exact law of the emitted tokens.
    truncation: Truncation = Truncation()

    def to_dict(self) -> dict:
        return {"noise_seed": self.noise_seed,
                "uncertainty": codec.uncertainty_to_dict(self.uncertainty),
                "truncation": [self.truncation.cap, self.truncation.eps]}

    @classmethod
    def from_dict(cls, d: dict | None) -> EmitArgs | None:
        if d is None:
            return None
        cap, eps = d.get("truncation", (Truncation.cap, Truncation.eps))
        return cls(codec.uncertainty_from_dict(d["uncertainty"]), int(d["noise_seed"]),
                   Truncation(int(cap), float(eps)))


@dataclass(frozen=True)
class VerifyArgs:
    """One block to verify: the last n prompt tokens of the request are the draft."""

    key: str  # names the result in the worker (vLLM may rewrite request ids internally)
    n: int
    spec: SamplingSpec  # the same transform the engine's sampler applies (seed unused here)
    # seeds the worker's CPU generator: the n accept uniforms, then the recovered or bonus
    # token's draw (the same draws on every TP rank and every device)
    draw_seed: int
    q: SparseRows  # the n draft distributions (normalised where the worker reads them)
    emit: EmitArgs | None = None  # None: no emitted tokens, and no cost for them
    # vLLM's min_tokens: these ids get probability 0 in the first `ban_rows` of the n + 1 rows
    ban: tuple[int, ...] = ()
    ban_rows: int = 0
    logprobs: int = -1  # >= 0: each emitted token's logprob and this many top tokens

    def to_extra_args(self) -> dict:
        lengths = self.q.offsets.diff().numpy().astype("<i4")
        return {EXTRA_ARGS_KEY: {
            "key": self.key, "n": self.n, "draw_seed": self.draw_seed,
            "spec": codec.sampling_to_dict(self.spec),
            "q_ids": self.q.ids.numpy().astype("<i4").tobytes(),
            "q_probs": self.q.probs.numpy().astype("<f4").tobytes(),
            "q_lengths": lengths.tobytes(),
            "emit": None if self.emit is None else self.emit.to_dict(),
            "ban": list(self.ban), "ban_rows": self.ban_rows, "logprobs": self.logprobs,
        }}

    @classmethod
    def from_extra_args(cls, extra_args: dict | None) -> VerifyArgs | None:
        raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if raw is None:
            return None
        lengths = torch.from_numpy(np.frombuffer(raw["q_lengths"], "<i4").astype(np.int64))
        q = SparseRows(torch.from_numpy(np.frombuffer(raw["q_ids"], "<i4").astype(np.int64)),
                       torch.from_numpy(np.frombuffer(raw["q_probs"], "<f4").copy()),
                       torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
        spec = codec.sampling_from_dict(raw["spec"])
        return cls(raw["key"], raw["n"], spec, raw["draw_seed"], q.normalised(),
                   EmitArgs.from_dict(raw.get("emit")), tuple(raw.get("ban", ())),
                   int(raw.get("ban_rows", 0)), int(raw.get("logprobs", -1)))

    @classmethod
    def build(cls, key: str, spec: SamplingSpec, draw_seed: int,
              dists: Sequence[tuple[Sequence[int], Sequence[float]]],
              emit: EmitArgs | None = None, ban: tuple[int, ...] = (),
              ban_rows: int = 0, logprobs: int | None = None) -> VerifyArgs:
        return cls(key, len(dists), spec, draw_seed, SparseRows.from_lists(dists), emit, ban,
                   ban_rows, -1 if logprobs is None else logprobs)


# Why a result has no outcome: the rows that predict the draft were not computed in this
# request's forward (served from the prefix cache); the caller re-runs without reading the cache.
ROWS_CACHED = "draft rows were served from the prefix cache"


def pack(array: np.ndarray, dtype: str) -> str:
    """A 1-D array as base64 of its little-endian bytes (travels as JSON and msgpack alike)."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def unpack(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).astype(dtype[1:])


@dataclass(frozen=True)
class EmittedRow:
    """One emitted token as the worker ships it: the sparse p at its position, and its u."""

    token: int
    u: float
    ids: str  # pack(support, "<i4")
    probs: str  # pack(weights, "<f2"): the float16 weights of the truncated p (law: / sum)


@dataclass(frozen=True)
class VerifyResult:
    key: str
    num_accepted: int = 0
    recovered: int | None = None  # the correction token when num_accepted < n
    target_probs: tuple[float, ...] = ()  # p_i(x_i)
    forward_ms: float = 0.0  # engine steps that computed this request (forward + sample + hook)
    hook_ms: float = 0.0  # of which this hook's own work for the request (rows, p, the math)
    error: str | None = None
    emitted: tuple[EmittedRow, ...] = ()  # m + 1 tokens, when VerifyArgs.emit asked for them
    logprobs: tuple[TokenLogprob, ...] = ()  # m + 1 entries, when VerifyArgs.logprobs >= 0

    def to_dict(self) -> dict:
        return asdict(self) | {"logprobs": [codec.logprob_to_dict(t) for t in self.logprobs]}

    @classmethod
    def from_dict(cls, d: dict) -> VerifyResult:
        return cls(**(d | {"target_probs": tuple(d.get("target_probs", ())),
                           "emitted": tuple(EmittedRow(**e) for e in d.get("emitted", ())),
                           "logprobs": tuple(codec.logprob_from_dict(t)
                                             for t in d.get("logprobs", ()))}))
