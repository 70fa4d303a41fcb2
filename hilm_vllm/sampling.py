"""The per-request sampling transform, identical on every tier.

Exactness needs the drafter's q and the verifiers' p to be the distributions the engines really
sample from. vLLM 0.32's sampler (`vllm/v1/sample/sampler.py`) applies, in this order: the
allowed-token mask, bad words, the logit bias, the presence / frequency / repetition penalties
(counting the request's prompt and its output so far), temperature, min-p, then top-k/top-p
(its own masks), then softmax. `processed_probs_batch` does the same with the same vLLM
functions (`apply_penalties`, `apply_top_k_top_p`), so q and p are what the sampler uses; a
draft row's output counts the draft tokens before it, as vLLM's own speculative decoding counts
them (`Sampler._combine_outputs_with_spec_tokens`); bad words (as token ids, tokenized as vLLM
does) are checked against the row's output with vLLM's own function. Pure functions of tensors;
no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

GREEDY_EPS = 1e-5  # vLLM treats temperature below this as greedy (sampling_params._SAMPLING_EPS)
MIN_TEMPERATURE = 1e-2  # vLLM raises any temperature in (0, this) to this (_MAX_TEMP)


FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32 (proto `float`)
INT32_MAX = (1 << 31) - 1  # proto `int32`


LOGIT_BIAS_LIMIT = 100.0  # vLLM clamps each bias to [-100, 100] (SamplingParams.from_optional)


@dataclass(frozen=True)
class Penalties:
    """vLLM's sampler transforms besides temperature and top-k/top-p, as its SamplingParams
    names them, validated as vLLM validates them. `output_start` is the absolute position of the
    completion's first token: the tokens before it are the prompt (the repetition penalty counts
    them), those from it on are the output (all three penalties count them), which is how
    vLLM's sampler sees a request that generates the completion itself."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by id
    allowed_token_ids: tuple[int, ...] = ()  # empty = every token
    output_start: int = 0
    # vLLM's bad words as token-id sequences (`SamplingParams.bad_words_token_ids`, from the
    # strings by vLLM's own tokenization): a sequence's last token is banned where the output
    # so far ends with the rest of it
    bad_words: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:  # also NaN
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got "
                             f"{self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if any(not math.isfinite(b) for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be finite numbers")
        bias = tuple(sorted((int(t), min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, float(b))))
                            for t, b in dict(self.logit_bias).items()))
        object.__setattr__(self, "logit_bias", bias)
        object.__setattr__(self, "allowed_token_ids",
                           tuple(sorted({int(t) for t in self.allowed_token_ids})))
        if any(t < 0 for t, _ in bias) or any(t < 0 for t in self.allowed_token_ids):
            raise ValueError("token ids in logit_bias and allowed_token_ids must be >= 0")
        if self.output_start < 0:
            raise ValueError(f"output_start must be >= 0, got {self.output_start}")
        words = tuple(tuple(int(t) for t in w) for w in self.bad_words)
        if any(not w for w in words) or any(t < 0 for w in words for t in w):
            raise ValueError("bad words must be non-empty sequences of token ids >= 0")
        object.__setattr__(self, "bad_words", words)

    @property
    def counts_history(self) -> bool:
        """Do the rows depend on the tokens before them (the three penalties)?"""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)

    @property
    def needs_context(self) -> bool:
        """Does a row need the tokens before it (the penalties, the bad words)?"""
        return self.counts_history or bool(self.bad_words)

    @property
    def neutral(self) -> bool:
        """Would vLLM's sampler do nothing with these?"""
        return not (self.counts_history or self.min_p or self.logit_bias
                    or self.allowed_token_ids or self.bad_words)


@dataclass(frozen=True)
class Structured:
    """A structured-output constraint on the rows a tier computes: vLLM's
    StructuredOutputsParams fields as JSON (`codec.structured_outputs` checked them),
    matched against the output from absolute position `output_start` on (the tokens before it
    are the prompt, which a grammar does not read, as in vLLM). A tier compiles it with vLLM's
    xgrammar backend (`hilm_vllm.server.grammar`) and masks each row with the grammar's state
    after the tokens before the row, as vLLM masks its logits before the sampler.
    `stop_token_ids`: the tokens that end the grammar's output, as vLLM passes them (EOS and the
    request's stop_token_ids); the tier that opens the session fills them in."""

    params: str
    output_start: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.params, str) or not self.params:
            raise ValueError("structured output params must be a non-empty JSON object text")
        if self.output_start < 0:
            raise ValueError(f"output_start must be >= 0, got {self.output_start}")
        object.__setattr__(self, "stop_token_ids",
                           tuple(sorted({int(t) for t in self.stop_token_ids})))


@dataclass(frozen=True)
class SamplingSpec:
    """A request's sampling parameters, validated once."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off (vLLM's -1 is taken as 0)
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    penalties: Penalties | None = field(default=None)  # None = none
    structured: Structured | None = None  # None = free text (the tiers mask rows with it)

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
        if self.penalties is not None and self.penalties.neutral:
            object.__setattr__(self, "penalties", None)  # one spelling of "none"

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def vllm_kwargs(self) -> dict:
        """Keyword arguments for `vllm.SamplingParams` with the same meaning (the penalties
        aside: the tiers that take them apply them themselves, `processed_probs_batch`)."""
        return {"temperature": self.temperature, "top_k": self.top_k or 0,
                "top_p": self.top_p, "seed": self.seed}


MAX_LOGPROBS = 20  # vLLM's default max_logprobs: the most top tokens a request may ask for


@dataclass(frozen=True)
class TokenLogprob:
    """A token's logprob under the distribution that decided it (vLLM's default
    `raw_logprobs`: the model's log-softmax before any transform) and the top tokens there."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


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
    logprob: TokenLogprob | None = None  # the drafter's raw logprob, when its session asks

    @property
    def dist(self) -> tuple[np.ndarray, np.ndarray]:
        return self.ids, self.probs


def processed_probs(logits: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """logits [N, V] (raw, float32) -> probabilities [N, V] the sampler draws from, on the
    logits' device (vLLM's mask function runs a Triton kernel on GPU: its k and p must be there).

    Greedy is one-hot on the argmax (vLLM's greedy sampler takes the argmax). A spec with
    penalties goes through `processed_probs_batch` (the ones that count the history need each
    row's context: an error here)."""
    if spec.penalties is not None:
        return processed_probs_batch(logits, [spec] * logits.shape[0])
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


def processed_probs_batch(logits: torch.Tensor, specs: Sequence[SamplingSpec],
                          contexts: Sequence[Sequence[int] | None] | None = None
                          ) -> torch.Tensor:
    """logits [N, V] raw, one spec per row -> the processed probabilities [N, V] of every row in
    one pass, as vLLM's sampler treats a batch: the allowed-token mask, logit bias and penalties
    (`penalised_logits`), temperature as a per-row tensor divisor, min-p, one top-k/top-p call
    with per-row k and p, greedy rows one-hot on their argmax (after the penalties, as vLLM's
    greedy sampler sees them). `contexts[i]`: every token up to and including row i's position
    (the row predicts the next one), needed by rows whose penalties count the history. On the
    logits' device; the input is not modified."""
    if all(s.penalties is None for s in specs) and len(
            {(s.temperature, s.top_k, s.top_p) for s in specs}) == 1:
        return processed_probs(logits, specs[0])
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    logits = penalised_logits(logits.float(), specs, contexts)
    n, vocab = logits.shape
    device = logits.device
    greedy = torch.tensor([s.greedy for s in specs], device=device)
    temps = torch.tensor([1.0 if s.greedy else s.temperature for s in specs],
                         dtype=torch.float32, device=device)
    scaled = logits / temps[:, None]
    if any(s.penalties is not None and s.penalties.min_p for s in specs):
        scaled = apply_min_p(scaled, torch.tensor(
            [0.0 if s.penalties is None else s.penalties.min_p for s in specs],
            dtype=torch.float32, device=device))
    k = (torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in specs],
                      dtype=torch.long, device=device)
         if any(0 < s.top_k < vocab for s in specs) else None)
    p = (torch.tensor([s.top_p for s in specs], dtype=torch.float32, device=device)
         if any(s.top_p < 1 for s in specs) else None)
    probs = torch.softmax(apply_top_k_top_p(scaled, k, p), dim=-1)
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()
    return torch.where(greedy[:, None], one_hot, probs)


def penalised_logits(logits: torch.Tensor, specs: Sequence[SamplingSpec],
                     contexts: Sequence[Sequence[int] | None] | None = None) -> torch.Tensor:
    """logits [N, V] float32 -> a copy with each row's allowed-token mask, bad words (vLLM's
    own check, on the row's output), logit bias and presence / frequency / repetition penalties
    applied in vLLM's order and with vLLM's own `apply_penalties` (row i's prompt:
    contexts[i][:output_start], its output: the rest). Rows
    without penalties are unchanged; the input is returned as is when no row has any. On the
    logits' device."""
    rows = [i for i, s in enumerate(specs) if s.penalties is not None]
    if not rows:
        return logits
    out = logits.clone()
    n, vocab = out.shape
    device = out.device
    for i in rows:
        pen = specs[i].penalties
        if any(t >= vocab for t in pen.allowed_token_ids) or any(
                t >= vocab for t, _ in pen.logit_bias):
            raise ValueError(f"a token id of allowed_token_ids or logit_bias is outside the "
                             f"vocabulary of {vocab} tokens")
        if pen.allowed_token_ids:
            banned = torch.ones(vocab, dtype=torch.bool, device=device)
            banned[torch.tensor(pen.allowed_token_ids, dtype=torch.long, device=device)] = False
            out[i].masked_fill_(banned, float("-inf"))
        if pen.bad_words:  # vLLM's own check, on the row's output so far
            if any(t >= vocab for w in pen.bad_words for t in w):
                raise ValueError(f"a bad word's token id is outside the vocabulary of {vocab} "
                                 f"tokens")
            if contexts is None or contexts[i] is None:
                raise ValueError("bad words need each row's context (the tokens before the "
                                 "position it predicts)")
            from vllm.v1.sample.ops.bad_words import _apply_bad_words_single_batch

            _apply_bad_words_single_batch(out[i], [list(w) for w in pen.bad_words],
                                          list(contexts[i][pen.output_start:]))
        if pen.logit_bias:
            ids = torch.tensor([t for t, _ in pen.logit_bias], dtype=torch.long, device=device)
            out[i, ids] += torch.tensor([b for _, b in pen.logit_bias], dtype=torch.float32,
                                        device=device)
    counted = [i for i in rows if specs[i].penalties.counts_history]
    if counted:
        if contexts is None or any(contexts[i] is None for i in counted):
            raise ValueError("presence/frequency/repetition penalties need each row's context "
                             "(the tokens before the position it predicts)")
        from vllm.model_executor.layers.utils import apply_penalties

        prompts, outputs = [], []
        for i in counted:
            ctx, start = contexts[i], specs[i].penalties.output_start
            prompts.append(list(ctx[:start]))
            outputs.append(list(ctx[start:]))
        index = torch.tensor(counted, dtype=torch.long, device=device)
        sub = apply_penalties(
            out.index_select(0, index), _padded(prompts, vocab, device),
            _padded(outputs, vocab, device),
            *(torch.tensor([getattr(specs[i].penalties, name) for i in counted],
                           dtype=torch.float32, device=device)
              for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")))
        out.index_copy_(0, index, sub)
    return out


def _padded(rows: list[list[int]], vocab: int, device) -> torch.Tensor:
    """Token lists -> [N, max(len, 1)] int64 padded with `vocab` (vLLM's padding id)."""
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), vocab, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out.to(device)


def apply_min_p(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """vLLM's min-p (`MinPLogitsProcessor.apply`) on temperature-scaled logits [N, V]: tokens
    whose probability is below min_p[i] x the row's largest are masked; a copy."""
    probs = torch.softmax(scaled, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True).mul_(min_p[:, None])
    return scaled.masked_fill(probs < threshold, float("-inf"))


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int
                   ) -> list[TokenLogprob]:
    """Raw logits [K, V] (row i decided tokens[i]) -> each token's logprob and the `top` most
    likely tokens of its row, as vLLM's sampler reports them (log-softmax in float32 of the
    raw logits). On the logits' device; K floats and K x top entries come to the host."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    index = torch.as_tensor(list(tokens), dtype=torch.long).to(logp.device)
    own = logp.gather(1, index[:, None]).squeeze(1).tolist()
    if top <= 0:
        return [TokenLogprob(v) for v in own]
    vals, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
    return [TokenLogprob(v, tuple(i), tuple(t))
            for v, i, t in zip(own, ids.tolist(), vals.tolist())]


def bitmask_allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """A grammar's token bitmask (xgrammar's layout: int32 [N, W], bit j of word i = token
    32 i + j allowed) -> bool [N, vocab], on the bitmask's device; ids past 32 W are not
    allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.to(torch.int32).unsqueeze(-1) >> bits) & 1).bool().flatten(1)
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    return allowed[:, :vocab]


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor
                  ) -> torch.Tensor:
    """logits [N, V] with every token a grammar does not allow set to -inf in `rows` (long [R];
    bitmask [R, W], xgrammar's layout), as vLLM's `apply_grammar_bitmask` does before its
    sampler; a copy, on the logits' device (the bitmask is moved there)."""
    allowed = bitmask_allowed(bitmask.to(logits.device), logits.shape[1])
    out = logits.clone()
    rows = rows.to(logits.device)
    out[rows] = out.index_select(0, rows).masked_fill(~allowed, float("-inf"))
    return out


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
