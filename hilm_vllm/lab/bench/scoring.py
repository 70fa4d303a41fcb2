"""Quality scoring shared by the benchmarks (bench/demo.py, bench/sweep.py): perplexity under the
LLM, TSR by shadow verification, exact match at T = 0 and U-HLM's cosine, per run, with 95%
intervals and the llm-only noise floor (the definitions are hilm_vllm.lab.quality's and DESIGN.md's
"Quality").

    outputs = [Output(prompt, text, tokens, token_ids, skipped_at, temperature, top_k, top_p)]
    scorer = ShadowScorer.for_zoo(zoo)                 # the LLM and the SLM in transformers
    scored = scorer.score(outputs)                      # [Scored]: nll, p(x) and q(x) of SKIPs
    quality_block(run, reference=llm_only, reseed=llm_only_other_seeds)   # the `quality` dict

Everything here runs after the benchmark, with the tiers stopped: the shadow verification is off
the critical path by construction.

What is scored, per request:
- ppl: the continuation's text is tokenized with the LLM's own tokenizer (no special tokens)
  and teacher-forced after the prompt (tokenized as the router does: with BOS), in float32;
  `hilm_vllm.lab.quality.PerplexityScorer` does it. Using the text (not the generated ids) is what
  DESIGN.md says, and it keeps tokenizations out of the figure: a model that samples a
  non-canonical split of a word is not charged for the split.
- TSR (the share of skipped tokens the LLM would have accepted): for each token x that the
  router kept on the device unverified (`usage.hilm.skipped_at`: completion indexes), with the
  exact context before it, p = the LLM's distribution and q = the drafter's, both as sampled
  (`hilm_vllm.sampling.processed_probs` on transformers logits, the request's temperature,
  top-k and top-p; q then truncated as the drafter truncates it, `sampling.truncated_probs` with
  the drafter config's `draft-top-k` / `draft-eps`, else the drafter's defaults), and TSR = the
  mean of min(1, p(x)/q(x))
  pooled over the run's skipped tokens (an expectation: no acceptance draw adds noise).
  At T = 0 both are one-hot: TSR is the share of skipped tokens equal to the LLM's argmax.
- The token ids. The positions in `skipped_at` index the *generated* token ids. The router's
  OpenAI API streams text only; if `usage.hilm` carries the ids (key `token_ids`), they are
  used. Otherwise the text is re-tokenized and the request counts for TSR only when that gives
  exactly `usage.completion_tokens` tokens (`aligned`); small models often sample
  non-canonical splits (the tiny zoo at T = 1: 3 of 25 continuations of 32 tokens re-tokenize
  to the same ids), so `tsr_coverage` (skipped tokens scored / skipped tokens) says how much of
  the run the TSR covers, and `tsr_source` where the ids came from.
- A skipped token whose recomputed q(x) is 0 (x outside the drafter's top-k in float32
  transformers logits while vLLM's kernel put it inside: a tie at the cut) is left out and
  counted in `tsr_dropped`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hilm_vllm.lab.quality import cosine, quality_summary, PerplexityScorer, SampleScores
from hilm_vllm.zoo import resolve_model
from hilm_vllm.stack import config_path

DRAFTER_CONFIG = "engine_configs/demo-slm.yaml"
IDS_KEY = "token_ids"  # usage.hilm key of the completion's token ids, when the router sends them


@dataclass
class Output:
    """One request's result, as the benchmark received it."""

    prompt: str
    text: str | None  # None: the request failed
    tokens: int = 0  # usage.completion_tokens
    token_ids: Sequence[int] | None = None  # the generated ids, when the router returns them
    skipped_at: Sequence[int] = ()  # completion indexes kept on the device unverified
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class Scored:
    """The shadow scores of one request (None where it failed or nothing applies)."""

    nll: float | None = None  # sum of -log p_LLM over the re-tokenized continuation
    n: int | None = None  # tokens in it
    skipped_p: list[float] | None = None  # LLM p(x) per scored SKIP (None: TSR not measurable)
    skipped_q: list[float] | None = None  # drafter q(x) of the same
    skipped: int = 0  # SKIPs the router reported
    dropped: int = 0  # SKIPs left out: recomputed q(x) = 0
    source: str | None = None  # "router" | "retokenized" | "misaligned" | None (failed)


def output_from_record(record, prompt: str, temperature: float, top_k: int = 0,
                       top_p: float = 1.0) -> Output:
    """An Output from bench/demo.py's RequestRecord (duck-typed: ok, text, tokens, hilm)."""
    usage = record.hilm or {}
    return Output(prompt, record.text if record.ok else None, record.tokens,
                  usage.get(IDS_KEY), list(usage.get("skipped_at") or ()), temperature, top_k,
                  top_p)


def drafter_truncation(config: str | Path = DRAFTER_CONFIG):
    """The drafter's proposal truncation (`draft-top-k`, `draft-eps` of its engine config, each
    else the drafter tier's default)."""
    import yaml

    from hilm_vllm.drafter.core import DrafterSettings  # loads torch / vLLM: only when it runs
    from hilm_vllm.sampling import Truncation  # loads torch / vLLM: only when it runs

    d = DrafterSettings()
    path = config_path(config)
    doc = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    return Truncation(int(doc.get("draft-top-k", d.draft_top_k)),
                      float(doc.get("draft-eps", d.draft_eps)))


def acceptance_at(p: np.ndarray, q: np.ndarray, tokens: Sequence[int],
                  positions: Sequence[int]) -> tuple[list[float], list[float], int]:
    """p, q [L, V] (the LLM's and the drafter's distributions predicting completion token t at
    row t), the completion ids and the skipped positions -> (p(x), q(x), dropped) over the
    positions with q(x) > 0. Pure: the TSR input of one request."""
    p_x, q_x, dropped = [], [], 0
    for t in positions:
        x = int(tokens[t])
        if q[t, x] <= 0:
            dropped += 1
            continue
        p_x.append(float(p[t, x]))
        q_x.append(float(q[t, x]))
    return p_x, q_x, dropped


class ShadowScorer:
    """The LLM (perplexity, p) and the drafter (q) in transformers, float32, on the CPU."""

    def __init__(self, llm: str | Path, slm: str | Path, truncation=None,
                 device: str = "cpu", batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM

        self.ppl = PerplexityScorer(llm, device=device, batch_size=batch_size)
        self.tokenizer = self.ppl.tokenizer
        self.llm = self.ppl.model
        self.slm = AutoModelForCausalLM.from_pretrained(resolve_model(str(slm)),
                                                        dtype=torch.float32).to(device)
        self.slm.eval()
        self.device = device
        from hilm_vllm.sampling import NO_TRUNCATION  # loads torch / vLLM: only when it runs

        self.truncation = truncation or NO_TRUNCATION  # the drafter's (drafter_truncation)

    @classmethod
    def for_zoo(cls, zoo, drafter_config: str | Path = DRAFTER_CONFIG, **kw) -> ShadowScorer:
        return cls(zoo.llm, zoo.slm, drafter_truncation(drafter_config), **kw)

    def completion_ids(self, out: Output) -> tuple[list[int] | None, str | None]:
        """(ids that `skipped_at` indexes, their source) or (None, why not)."""
        if out.text is None:
            return None, None
        if out.token_ids is not None:
            return [int(t) for t in out.token_ids], "router"
        ids = self.tokenizer(out.text, add_special_tokens=False)["input_ids"]
        return (ids, "retokenized") if len(ids) == out.tokens else (None, "misaligned")

    def score(self, outputs: Sequence[Output]) -> list[Scored]:
        ok = [i for i, o in enumerate(outputs) if o.text is not None]
        nll, n = self.ppl.score([outputs[i].prompt for i in ok], [outputs[i].text for i in ok])
        scored = [Scored() for _ in outputs]
        for j, i in enumerate(ok):
            scored[i].nll, scored[i].n = float(nll[j]), int(n[j])
        for i, out in enumerate(outputs):
            if out.text is None:
                continue
            s = scored[i]
            s.skipped = len(out.skipped_at)
            ids, s.source = self.completion_ids(out)
            if ids is None:
                continue
            if not out.skipped_at:
                s.skipped_p, s.skipped_q = [], []
                continue
            s.skipped_p, s.skipped_q, s.dropped = self._tsr_terms(out, ids)
        return scored

    def _tsr_terms(self, out: Output, ids: list[int]):
        import torch

        # loads torch / vLLM: only when it runs
        from hilm_vllm.sampling import SamplingSpec, processed_probs, truncated_probs

        prompt = self.tokenizer(out.prompt, add_special_tokens=True)["input_ids"]
        positions = sorted({int(t) for t in out.skipped_at if 0 <= t < len(ids)})
        end = positions[-1] + 1  # rows past the last skip are not needed
        seq = torch.tensor([prompt + ids[:end]], device=self.device)
        rows = slice(len(prompt) - 1, len(prompt) - 1 + end)  # row t predicts completion t
        spec = SamplingSpec(out.temperature, out.top_k, out.top_p)
        with torch.inference_mode():
            p = processed_probs(self.llm(input_ids=seq).logits[0, rows].float(), spec)
            q = truncated_probs(processed_probs(self.slm(input_ids=seq).logits[0, rows].float(),
                                                spec), self.truncation)[0]
        return acceptance_at(p.cpu().numpy(), q.cpu().numpy(), ids, positions)


# ---- per-prompt columns -> the quality block ----------------------------------------------------

@dataclass
class RunScores:
    """Per-prompt scores of one run (index i = prompt i, with the same seed in every run)."""

    scored: list[Scored]
    cosine: list[float | None] | None = None  # cos(output, reference text)
    outputs_t0: list | None = None  # T = 0 outputs (ids or texts) of the same prompts
    extra: dict = field(default_factory=dict)

    def sample_scores(self) -> SampleScores:
        s = self.scored
        return SampleScores(
            nll=[x.nll for x in s], tokens=[x.n for x in s], outputs_t0=self.outputs_t0,
            cosine=self.cosine, skipped_p=[x.skipped_p for x in s],
            skipped_q=[x.skipped_q for x in s])


def tsr_details(scored: Sequence[Scored]) -> dict:
    """How much of the run's skipped tokens the TSR covers, and where the ids came from."""
    skipped = sum(s.skipped for s in scored)
    scored_n = sum(len(s.skipped_p or ()) for s in scored)
    sources = sorted({s.source for s in scored if s.source and s.skipped})
    return {"tsr_tokens": scored_n, "skipped_tokens": skipped,
            "tsr_coverage": scored_n / skipped if skipped else None,
            "tsr_dropped": sum(s.dropped for s in scored),
            "tsr_source": ",".join(sources) or None}


def quality_block(run: RunScores, reference: RunScores | None = None,
                  reseed: RunScores | None = None) -> dict:
    """The `quality` dict of one run: hilm_vllm.lab.quality.quality_summary (ppl_llm, ppl_ratio, tsr,
    exact_match_t0, cosine_to_reference, accuracy_ratio, ci95, noise_floor) + TSR coverage."""
    summary = quality_summary(run.sample_scores(),
                              reference.sample_scores() if reference is not None else None,
                              reseed.sample_scores() if reseed is not None else None)
    return summary | tsr_details(run.scored) | run.extra


def per_prompt_cosines(texts: Sequence[str | None], references: Sequence[str],
                       vectors: dict[str, np.ndarray]) -> list[float | None]:
    """cos(text_i, reference_i) from precomputed embeddings (None where the request failed)."""

    return [None if t is None else cosine(vectors[t], vectors[r])
            for t, r in zip(texts, references)]


def embed_all(texts: Sequence[str | None], embed: Callable) -> dict[str, np.ndarray]:
    """{text: embedding} for the distinct texts (one encoder call)."""
    distinct = sorted({t for t in texts if t is not None})
    return dict(zip(distinct, embed(distinct))) if distinct else {}
