"""The per-request sampling transform, identical on every tier.

Exactness needs the drafter's q and the verifiers' p to be the distributions the engines really
sample from. vLLM's sampler applies temperature, then top-k/top-p (its own masks), then softmax;
`processed_probs` calls the same vLLM mask function, so q and p are bit-for-bit what the sampler
uses. Pure functions of tensors; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GREEDY_EPS = 1e-5  # vLLM treats temperature below this as greedy (sampling_params._SAMPLING_EPS)


FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32 (proto `float`)
INT32_MAX = (1 << 31) - 1  # proto `int32`


@dataclass(frozen=True)
class SamplingSpec:
    """A request's sampling parameters, validated once."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off (vLLM's -1 is taken as 0)
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        # Finite as a float32 too: the wire carries it as one, and a larger double arrives as
        # inf, which vLLM refuses deep inside a tier (found by fuzzing: 1.8e266 -> 503).
        if not 0 <= self.temperature <= FLOAT32_MAX:  # also NaN
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if not 0 <= self.top_k <= INT32_MAX:  # an int32 on the wire (found by fuzzing: 500)
            raise ValueError(f"top_k must be in [0, {INT32_MAX}], or -1 / 0 for off, got "
                             f"{self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def vllm_kwargs(self) -> dict:
        """Keyword arguments for `vllm.SamplingParams` with the same meaning."""
        return {"temperature": self.temperature, "top_k": self.top_k or 0,
                "top_p": self.top_p, "seed": self.seed}


@dataclass(frozen=True, eq=False)
class ScoredToken:
    """A token with its uncertainty and the sparse distribution it is an exact sample of: what
    the drafter drafts (q) and what a verifier emits (its p), from the drafter's processor to
    the verifier's hook. Conversions that remain, and why:
    - worker -> API process: raw little-endian bytes (drafter push channel) or base64 text
      (`verifier.wire.EmittedRow`, JSON/msgpack), decoded to these arrays once;
    - API process <-> gRPC: `codec.dist_to_pb` / `codec.scored_from_pb` (protobuf has its
      own repeated fields);
    - verifier API -> worker: `rejection.SparseRows` packs a block's rows into three flat
      tensors (the rejection math works on those).
    """

    token_id: int
    uncertainty: float
    ids: np.ndarray  # [S] int32: the support (probability > 0)
    probs: np.ndarray  # [S] float32: the probabilities there (sum to 1)

    @property
    def dist(self) -> tuple[np.ndarray, np.ndarray]:
        return self.ids, self.probs


def processed_probs(logits: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """logits [N, V] (raw, float32) -> probabilities [N, V] the sampler draws from, on the
    logits' device (vLLM's mask function runs a Triton kernel on GPU: its k and p must be there).

    Greedy is one-hot on the argmax (vLLM's greedy sampler takes the argmax)."""
    logits = logits.float()
    if spec.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    scaled = logits / spec.temperature
    n, vocab = scaled.shape
    device = scaled.device
    k = (torch.full((n,), spec.top_k, dtype=torch.long, device=device)
         if 0 < spec.top_k < vocab else None)
    p = (torch.full((n,), spec.top_p, dtype=torch.float32, device=device)
         if spec.top_p < 1 else None)
    scaled = apply_top_k_top_p(scaled.clone(), k, p)
    return torch.softmax(scaled, dim=-1)


def mask_tokens(logits: torch.Tensor, ids, rows: int) -> torch.Tensor:
    """logits [N, V] with `ids` set to -inf in the first `rows` rows (vLLM's min_tokens mask of
    the stop tokens), on the logits' device; the input is not modified."""
    rows = min(rows, logits.shape[0])
    if rows <= 0 or not len(ids):
        return logits
    out = logits.clone()
    index = torch.as_tensor(list(ids), dtype=torch.long, device=logits.device)
    out[:rows, index] = float("-inf")
    return out


def to_sparse(probs: torch.Tensor) -> tuple[list[int], list[float]]:
    """probs [V] (any device) -> (token ids, probabilities) of its support, exactly."""
    probs = probs.cpu()  # one transfer; the lists are built on the host anyway
    ids = torch.nonzero(probs > 0).flatten()
    return ids.tolist(), probs[ids].tolist()
