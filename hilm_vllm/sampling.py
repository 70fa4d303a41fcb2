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
MIN_TEMPERATURE = 1e-2  # vLLM raises any temperature in (0, this) to this (_MAX_TEMP)


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
        if 0 < self.temperature < MIN_TEMPERATURE:
            # vLLM's SamplingParams raises it (sampling_params.py, _MAX_TEMP): the one clamp, so
            # llm-only, the drafter's q and every verifier's p use the same value
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)
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
    # [S] float32: the weights there; the law is probs / probs.sum() (a drafter's row holds
    # float16 values summing to 1 within 1e-3; see `Truncation`, `pack_row`)
    probs: np.ndarray

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

    n, vocab = logits.shape
    # a per-row tensor divisor, as vLLM's sampler divides (on CUDA a Python scalar divisor
    # becomes a multiplication by its reciprocal: other bits)
    scaled = logits / torch.full((n, 1), spec.temperature, dtype=torch.float32,
                                 device=logits.device)
    device = scaled.device
    k = (torch.full((n,), spec.top_k, dtype=torch.long, device=device)
         if 0 < spec.top_k < vocab else None)
    p = (torch.full((n,), spec.top_p, dtype=torch.float32, device=device)
         if spec.top_p < 1 else None)
    scaled = apply_top_k_top_p(scaled.clone(), k, p)
    return torch.softmax(scaled, dim=-1)


def processed_probs_batch(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    """logits [N, V] raw, one spec per row -> the processed probabilities [N, V] of every row in
    one pass, as vLLM's sampler treats a batch: temperature as a per-row tensor divisor, one
    top-k/top-p call with per-row k and p, greedy rows one-hot on their argmax. On the logits'
    device."""
    if len({(s.temperature, s.top_k, s.top_p) for s in specs}) == 1:
        return processed_probs(logits, specs[0])
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    logits = logits.float()
    n, vocab = logits.shape
    device = logits.device
    greedy = torch.tensor([s.greedy for s in specs], device=device)
    temps = torch.tensor([1.0 if s.greedy else s.temperature for s in specs],
                         dtype=torch.float32, device=device)
    k = (torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in specs],
                      dtype=torch.long, device=device)
         if any(0 < s.top_k < vocab for s in specs) else None)
    p = (torch.tensor([s.top_p for s in specs], dtype=torch.float32, device=device)
         if any(s.top_p < 1 for s in specs) else None)
    probs = torch.softmax(apply_top_k_top_p(logits / temps[:, None], k, p), dim=-1)
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()
    return torch.where(greedy[:, None], one_hot, probs)


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


# ---- the drafter's proposal: truncated, compact, and exactly what is drawn from ---------------


@dataclass(frozen=True)
class Truncation:
    """How a proposal row is cut before it is drawn from and shipped: the smallest set of the
    most likely tokens holding mass >= 1 - eps of the processed distribution, at most `cap` of
    them, renormalised, then rounded to float16 weights. The proposal IS that row (the token is
    drawn from weights / sum(weights)), so speculative sampling stays exact: it is exact for any
    proposal the verifier knows exactly. `cap` 0 = no cap, `eps` 0 = keep every token with
    probability > 0 (the untruncated proposal, still float16-rounded)."""

    cap: int = 64
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.cap < 0:
            raise ValueError(f"the proposal's cap must be >= 0 (0 = none), got {self.cap}")
        if not 0 <= self.eps < 1:  # also NaN
            raise ValueError(f"the proposal's eps must be in [0, 1), got {self.eps}")


NO_TRUNCATION = Truncation(0, 0.0)
WEIGHT_DTYPE = "<f2"  # how proposal weights travel (numpy dtype): float16, little-endian
ID_DTYPE = "<i4"  # how token ids travel


def truncate(probs: torch.Tensor, trunc: Truncation) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [N, V] (rows summing to 1) -> (ids [N, c] int64, weights [N, c] float32), c =
    min(cap, V), most likely first: the truncated rows (see `Truncation`), each weight a float16
    value (zeros past the kept set, and where float16 underflows). On the probs' device; cost
    O(N x V) for the top-c selection, nothing dense leaves the device."""
    vocab = probs.shape[-1]
    c = vocab if trunc.cap <= 0 else min(trunc.cap, vocab)
    vals, ids = probs.float().topk(c, dim=-1)  # sorted, most likely first
    if trunc.eps > 0:
        before = vals.cumsum(-1) - vals  # mass strictly ahead of each entry
        vals = torch.where(before < 1 - trunc.eps, vals, torch.zeros_like(vals))
    vals = vals / vals.sum(-1, keepdim=True)
    return ids, vals.half().float()


def truncated_probs(probs: torch.Tensor, trunc: Truncation
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """probs [N, V] -> (dense [N, V] float32, ids [N, c], weights [N, c]): the truncated rows
    (`truncate`) as normalised dense rows, on the probs' device, with the float16 weights that
    are shipped for them (their law is weights / sum, which the dense rows are)."""
    ids, weights = truncate(probs, trunc)
    dense = torch.zeros(probs.shape, dtype=torch.float32, device=probs.device)
    dense.scatter_(1, ids, (weights.double() / weights.double().sum(-1, keepdim=True)).float())
    return dense, ids, weights


def draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """weights [N, c] >= 0 (rows not all 0), uniforms [N] in [0, 1) (float64, any device) ->
    column index [N] int64, row i drawn w.p. weights[i] / sum(weights[i]) by inverse CDF in
    float64 on the weights' device. A zero weight is never drawn."""
    cdf = weights.double().cumsum(-1)  # [N, c]
    x = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]  # [N, 1]
    return torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_max_(weights.shape[-1] - 1)


def seed_uniform(seed: int) -> float:
    """A uniform in [0, 1) from a 63-bit seed (`seeds.derive_seed`): the same on every device."""
    return (seed >> 10) * 2.0 ** -53


def pack_row(ids: np.ndarray, weights: np.ndarray) -> tuple[bytes, bytes]:
    """One truncated row -> (ids <i4 bytes, weights <f2 bytes) of its entries with weight > 0:
    what crosses every boundary (worker -> API process, gRPC, the verifier's engine request)."""
    keep = weights > 0
    return (np.ascontiguousarray(ids[keep], ID_DTYPE).tobytes(),
            np.ascontiguousarray(weights[keep], WEIGHT_DTYPE).tobytes())


def unpack_row(ids: bytes, weights: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights) bytes -> (ids int32 [S], weights float32 [S]), the weights exactly as
    sent (float16 values): the law is weights / sum(weights); whoever needs probabilities
    normalises (`rejection.SparseRows` does), so re-packing a row never rounds it again."""
    return (np.frombuffer(ids, ID_DTYPE).astype(np.int32),
            np.frombuffer(weights, WEIGHT_DTYPE).astype(np.float32))
