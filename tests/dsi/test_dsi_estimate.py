"""Estimating a and c: the pure parts as tables, the vLLM part on the tiny zoo."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hilm_vllm.lab.dsi.estimate import acceptance_from_matches, argmax_tokens, measure, predict


@pytest.mark.parametrize("matches,a", [
    ([True, True, True, False], 0.75),  # one run of 3: a = 1 - 1/4
    ([False, False], 0.0),
    ([True] * 5, 1.0),
    ([True, False, True, True, False, True], 4 / 6),  # runs 1, 2 (+ a censored 1)
])
def test_acceptance_from_matches(matches, a):
    assert acceptance_from_matches(matches) == pytest.approx(a)


def test_acceptance_needs_positions():
    with pytest.raises(ValueError):
        acceptance_from_matches([])


def test_argmax_tokens_reads_rank_1():
    lp = lambda rank: SimpleNamespace(rank=rank, logprob=-1.0)  # noqa: E731
    rows = [None, {7: lp(3), 2: lp(1)}, {5: lp(1)}]
    assert argmax_tokens(rows) == [None, 2, 5]


def test_predict_edges():
    useless = predict(0.5, 0.0, 5, 7, 200, 3, 0)  # nothing accepted: DSI falls back to non-SI
    assert useless["dsi_speedup"] == 1.0 and useless["si_speedup"] < 1.0
    good = predict(0.05, 0.9, 10, 7, 500, 3, 0)
    assert good["dsi_speedup"] > good["si_speedup"] > 2
    assert good["dsi_k"] >= 3  # N = 7 servers at c = 0.05 require k >= 3
    assert predict(1.7, 0.9, 3, 7, 100, 2, 0)["c_used"] == 1.0  # slower drafter: clamped


def _hf_greedy_matches(drafter_dir, seqs) -> list[bool]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(drafter_dir, dtype=torch.float32).eval()
    hits = []
    with torch.no_grad():
        for ids, gen in seqs:
            logits = model(input_ids=torch.tensor([ids + gen])).logits[0]
            guess = logits[len(ids) - 1:-1].argmax(-1).tolist()  # position i predicts i + 1
            hits += [g == t for g, t in zip(guess, gen)]
    return hits


@pytest.mark.slow
def test_matches_equal_a_transformers_recount(tiny_zoo, inproc_vllm):
    """Scored on real text (the held-out references), so the drafter misses often and an
    off-by-one alignment could not go unnoticed."""
    import gc

    from transformers import AutoTokenizer

    from hilm_vllm.lab.dsi.estimate import _engine, _matches

    tok = AutoTokenizer.from_pretrained(tiny_zoo.slm)
    seqs = [(tok(p["prompt"])["input_ids"], tok(p["reference"], add_special_tokens=False)
             ["input_ids"][:24]) for p in tiny_zoo.heldout_prompts(3)]
    llm = _engine(tiny_zoo.slm, 1024)
    try:
        hits = _matches(llm, seqs)
    finally:
        del llm
        gc.collect()
    assert len(hits) == sum(len(gen) for _, gen in seqs)
    assert 0 < sum(hits) < len(hits)
    assert hits == _hf_greedy_matches(tiny_zoo.slm, seqs)


@pytest.mark.slow
def test_measure_on_the_tiny_zoo(tiny_zoo, inproc_vllm):
    """A model drafting for itself is accepted everywhere; the report has every pair."""
    models = {"slm": tiny_zoo.slm, "ilm": tiny_zoo.llm, "llm": tiny_zoo.llm}
    tokens = 12
    report = measure(models, tiny_zoo.heldout_prompts(2), tokens, rounds=1)
    pairs = report["pairs"]
    assert set(pairs) == {"slm->ilm", "slm->llm", "ilm->llm"}
    assert all(p["positions"] == 2 * tokens for p in pairs.values())
    assert pairs["ilm->llm"]["a"] == 1.0  # the same model drafts what it then verifies
    assert pairs["slm->ilm"]["a"] == pairs["slm->llm"]["a"]  # ilm and llm are one model here
    assert all(r["ttft_s"] > 0 and r["tpot_s"] >= 0 for r in report["latency"].values())
