"""What crosses between the verifier's API process and vLLM's worker, both ways.

A verification request travels inside `SamplingParams.extra_args[EXTRA_ARGS_KEY]` (msgpack to the
engine core, then to the worker), so it holds only plain values; the draft distributions are
packed as compact little-endian arrays. The worker's answer comes back from
`collective_rpc("hilm_pop_verify", key)` as a plain dict. Full vocabulary rows never travel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hilm_vllm.rejection import SparseRows
from hilm_vllm.sampling import SamplingSpec

EXTRA_ARGS_KEY = "hilm_verify"


@dataclass(frozen=True)
class VerifyArgs:
    """One block to verify: the last n prompt tokens of the request are the draft."""

    key: str  # names the result in the worker (vLLM may rewrite request ids internally)
    n: int
    spec: SamplingSpec  # the same transform the engine's sampler applies (seed unused here)
    draw_seed: int  # seeds the worker's uniforms and residual draw (same on every TP rank)
    q: SparseRows  # the n draft distributions

    def to_extra_args(self) -> dict:
        lengths = self.q.offsets.diff().numpy().astype("<i4")
        return {EXTRA_ARGS_KEY: {
            "key": self.key, "n": self.n, "draw_seed": self.draw_seed,
            "temperature": self.spec.temperature, "top_k": self.spec.top_k,
            "top_p": self.spec.top_p,
            "q_ids": self.q.ids.numpy().astype("<i4").tobytes(),
            "q_probs": self.q.probs.numpy().astype("<f4").tobytes(),
            "q_lengths": lengths.tobytes(),
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
        spec = SamplingSpec(raw["temperature"], raw["top_k"], raw["top_p"])
        return cls(raw["key"], raw["n"], spec, raw["draw_seed"], q)

    @classmethod
    def build(cls, key: str, spec: SamplingSpec, draw_seed: int,
              dists: Sequence[tuple[Sequence[int], Sequence[float]]]) -> VerifyArgs:
        return cls(key, len(dists), spec, draw_seed, SparseRows.from_lists(dists))


# Why a result has no outcome: the rows that predict the draft were not computed in this
# request's forward (served from the prefix cache); the caller re-runs without reading the cache.
ROWS_CACHED = "draft rows were served from the prefix cache"


@dataclass(frozen=True)
class VerifyResult:
    key: str
    num_accepted: int = 0
    recovered: int | None = None  # the correction token when num_accepted < n
    target_probs: tuple[float, ...] = ()  # p_i(x_i)
    forward_ms: float = 0.0  # engine steps that computed this request (forward + sample + hook)
    hook_ms: float = 0.0  # of which this hook's own work for the request (rows, p, the math)
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VerifyResult:
        return cls(**(d | {"target_probs": tuple(d.get("target_probs", ()))}))
