"""bench/scoring.py: TSR of skipped positions with known p and q, ids, the quality block, and a
tiny-zoo smoke test of the shadow scorer against a direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hilm_vllm.lab.bench import scoring
from hilm_vllm.lab.bench.scoring import Output, RunScores, Scored, acceptance_at, quality_block, tsr_details


def test_tsr_terms_read_p_and_q_at_the_skipped_positions_only():
    # 4 completion tokens over a vocabulary of 3; rows t predict completion token t.
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2], [0.3, 0.3, 0.4]])
    q = np.array([[0.25, 0.5, 0.25], [0.2, 0.0, 0.8], [0.3, 0.3, 0.4], [1.0, 0.0, 0.0]])
    tokens = [0, 1, 0, 2]
    p_x, q_x, dropped = acceptance_at(p, q, tokens, positions=[0, 2, 3])
    # position 3: q(2) = 0 (cannot have been drafted: recomputation mismatch) -> left out
    assert p_x == [0.5, 0.6] and q_x == [0.25, 0.3] and dropped == 1
    run = RunScores([Scored(skipped_p=p_x, skipped_q=q_x, skipped=3, dropped=1,
                            source="router")])
    block = quality_block(run)
    assert block["tsr"] == pytest.approx(1.0)  # p >= q at both: both accepted for sure
    p_x, q_x, dropped = acceptance_at(p, q, tokens, positions=[1])  # q(1) = 0 at row 1
    assert p_x == [] and q_x == [] and dropped == 1


def test_tsr_pools_skipped_tokens_over_the_run_and_reports_coverage():
    # prompt 0: terms min(1, .2/.4) = .5 and 1; prompt 1: .25; prompt 2: no ids (misaligned)
    scored = [Scored(skipped_p=[0.2, 0.9], skipped_q=[0.4, 0.3], skipped=2, source="router"),
              Scored(skipped_p=[0.1], skipped_q=[0.4], skipped=1, source="router"),
              Scored(skipped=3, source="misaligned"),
              Scored(skipped_p=[], skipped_q=[], skipped=0, source="router")]
    block = quality_block(RunScores(scored))
    assert block["tsr"] == pytest.approx((0.5 + 1 + 0.25) / 3)
    lo, hi = block["ci95"]["tsr"]
    assert lo <= block["tsr"] <= hi
    d = tsr_details(scored)
    assert d == {"tsr_tokens": 3, "skipped_tokens": 6, "tsr_coverage": 0.5, "tsr_dropped": 0,
                 "tsr_source": "misaligned,router"}
    assert tsr_details([Scored(skipped_p=[], skipped_q=[])])["tsr_coverage"] is None


def test_quality_block_has_the_issue_keys_ratios_against_the_reference_and_noise_floor():
    def run(nll, n, cos):
        return RunScores([Scored(nll=a, n=b) for a, b in zip(nll, n)], cosine=cos)

    ref = run([10.0, 20.0], [10, 10], [0.5, 0.5])
    pol = run([12.0, 24.0], [10, 10], [0.25, 0.5])
    reseed = run([11.0, 19.0], [10, 10], [0.5, 0.5])
    block = quality_block(pol, ref, reseed)
    for key in ("ppl_llm", "ppl_ratio", "tsr", "exact_match_t0", "cosine_to_reference",
                "accuracy_ratio", "ci95", "noise_floor", "tsr_coverage"):
        assert key in block, key
    assert block["ppl_llm"] == pytest.approx(math.exp(36 / 20))
    assert block["ppl_ratio"] == pytest.approx(math.exp(36 / 20) / math.exp(30 / 20))
    assert block["accuracy_ratio"] == pytest.approx(0.75)
    assert block["tsr"] is None  # nothing skipped
    assert block["noise_floor"]["ppl_ratio"]["value"] == pytest.approx(1.0)
    assert quality_block(ref, ref)["ppl_ratio"] == pytest.approx(1.0)


def test_drafter_truncation_from_its_config_else_the_tier_defaults(tmp_path):
    from hilm_vllm.drafter.core import DrafterSettings
    from hilm_vllm.sampling import Truncation

    assert scoring.drafter_truncation("no/such.yaml") == DrafterSettings().truncation
    config = tmp_path / "slm.yaml"
    config.write_text("draft-top-k: 8\ndraft-eps: 0.01\n")
    assert scoring.drafter_truncation(config) == Truncation(8, 0.01)


class _Record:
    def __init__(self, text, tokens, hilm, ok=True):
        self.text, self.tokens, self.hilm, self.ok = text, tokens, hilm, ok


def test_output_from_a_request_record():
    out = scoring.output_from_record(_Record("ab", 2, {"skipped_at": [1], "token_ids": [5, 6]}),
                                     "p", 0.7, top_k=4)
    assert (out.text, out.tokens, list(out.token_ids), list(out.skipped_at)) == ("ab", 2,
                                                                                  [5, 6], [1])
    assert (out.temperature, out.top_k) == (0.7, 4)
    failed = scoring.output_from_record(_Record("", 0, None, ok=False), "p", 1.0)
    assert failed.text is None and failed.token_ids is None and list(failed.skipped_at) == []


@pytest.fixture(scope="module")
def tiny_scorer(tiny_zoo):
    return scoring.ShadowScorer.for_zoo(tiny_zoo)


def test_shadow_scorer_on_the_tiny_zoo_matches_a_direct_computation(tiny_scorer, tiny_zoo):
    """p and q at the skipped positions equal the models' processed distributions computed
    directly; ppl equals PerplexityScorer's; the top-k cap applies to q, not to p."""
    import torch
    from transformers import AutoModelForCausalLM

    from hilm_vllm.sampling import SamplingSpec, processed_probs

    sc = tiny_scorer
    prompt = tiny_zoo.heldout_prompts(1)[0]["prompt"]
    ids = [40, 41, 300, 7, 99, 12]
    text = sc.tokenizer.decode(ids)
    out = Output(prompt, text, len(ids), token_ids=ids, skipped_at=[0, 3, 4],
                 temperature=0.8, top_k=0)
    (s,) = sc.score([out])
    assert s.source == "router" and s.skipped == 3 and s.dropped + len(s.skipped_p) == 3
    prompt_ids = sc.tokenizer(prompt)["input_ids"]
    seq = torch.tensor([prompt_ids + ids])
    slm = AutoModelForCausalLM.from_pretrained(tiny_zoo.slm, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = sc.llm(input_ids=seq).logits[0].float()
        lq = slm(input_ids=seq).logits[0].float()
    p = processed_probs(lp, SamplingSpec(0.8, 0, 1.0))
    q = processed_probs(lq, SamplingSpec(0.8, 64, 1.0))  # the drafter's cap
    want_p, want_q = [], []
    for t in (0, 3, 4):
        row, x = len(prompt_ids) - 1 + t, ids[t]
        if q[row, x] > 0:
            want_p.append(float(p[row, x]))
            want_q.append(float(q[row, x]))
    assert s.skipped_p == pytest.approx(want_p, rel=1e-4, abs=1e-7)
    assert s.skipped_q == pytest.approx(want_q, rel=1e-4, abs=1e-7)
    nll, n = sc.ppl.score([prompt], [text])
    assert s.nll == pytest.approx(float(nll[0])) and s.n == int(n[0])


def test_shadow_scorer_ids_failed_and_greedy(tiny_scorer, tiny_zoo):
    sc = tiny_scorer
    prompt = tiny_zoo.heldout_prompts(1)[0]["prompt"]
    text = sc.tokenizer.decode([40, 41, 42])
    canonical = sc.tokenizer(text, add_special_tokens=False)["input_ids"]
    outs = [Output(prompt, None),  # failed
            Output(prompt, text, len(canonical), skipped_at=[0]),  # re-tokenized, aligned
            Output(prompt, text, len(canonical) + 5, skipped_at=[0]),  # misaligned
            Output(prompt, text, len(canonical), skipped_at=[0, 1], temperature=0.0)]
    failed, aligned, misaligned, greedy = sc.score(outs)
    assert failed.nll is None and failed.source is None
    assert aligned.source == "retokenized" and len(aligned.skipped_p) + aligned.dropped == 1
    assert misaligned.source == "misaligned" and misaligned.skipped_p is None
    assert misaligned.nll == pytest.approx(aligned.nll)  # ppl is scored from the text anyway
    assert set(greedy.skipped_p) <= {0.0, 1.0} and greedy.skipped_q == [1.0] * len(
        greedy.skipped_q)  # T = 0: one-hot; q is the drafter's argmax
