"""hilm_vllm.lab.quality: cosine math, aggregation, exact match, TSR, perplexity under the LLM
(against transformers directly, on the tiny zoo), bootstrap intervals, the quality block, and the
offline embedder."""

import json
import math

import numpy as np
import pytest

from hilm_vllm.lab import quality as q

S = 1 / math.sqrt(2)


@pytest.mark.parametrize("a, b, expected", [
    ([1, 0], [1, 0], 1.0),
    ([1, 0], [0, 1], 0.0),
    ([1, 0], [-1, 0], -1.0),
    ([1, 1], [1, 0], S),
    ([3, 4], [6, 8], 1.0),  # scale does not matter
    ([0, 0], [1, 0], 0.0),  # a zero vector has no direction: 0, not NaN
])
def test_cosine(a, b, expected):
    assert q.cosine(a, b) == pytest.approx(expected)


def test_cosine_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one length"):
        q.cosine([1, 0, 0], [1, 0])


def test_paired_cosines_are_row_by_row():
    a = np.array([[1, 0], [1, 1], [0, 0], [2, 0]])
    b = np.array([[1, 0], [1, 0], [1, 0], [0, 3]])
    assert q.paired_cosines(a, b) == pytest.approx([1.0, S, 0.0, 0.0])
    assert q.mean_cosine(a, b) == pytest.approx((1 + S) / 4)
    assert q.mean_cosine(np.zeros((0, 2)), np.zeros((0, 2))) is None
    with pytest.raises(ValueError):
        q.paired_cosines(a, b[:2])


@pytest.mark.parametrize("values, expected", [
    ([1.0, 2.0, 3.0], 2.0), ([1.0, None, 3.0], 2.0), ([None, float("nan"), 4.0], 4.0),
    ([], None), ([None], None),
])
def test_mean_or_none(values, expected):
    assert q.mean_or_none(values) == expected


@pytest.mark.parametrize("num, den, expected", [
    (1.0, 4.0, 0.25), (0.0, 2.0, 0.0), (1.0, 0.0, None), (None, 2.0, None), (1.0, None, None),
])
def test_ratio(num, den, expected):
    assert q.ratio(num, den) == expected


def test_exact_match_rate_skips_missing_pairs():
    assert q.exact_match_rate(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == 0.75
    assert q.exact_match_rate([[1, 2], [3]], [[1, 2], [3, 4]]) == 0.5  # token lists too
    assert q.exact_match_rate(["a", None, "c"], ["a", "b", None]) == 1.0  # one pair left
    assert q.exact_match_rate([None], ["a"]) is None
    with pytest.raises(ValueError, match="2 outputs against 1"):
        q.exact_match_rate(["a", "b"], ["a"])


def test_model_path_is_the_packaged_model():
    path = q.model_path()
    assert (path / "model.safetensors").is_file() and (path / "modules.json").is_file()


@pytest.mark.slow  # importing sentence-transformers + loading the model: 11-35 s on 2 cores
def test_embedder_gives_unit_384_dim_vectors_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    emb = q.Embedder()
    texts = ["def parse(self, text):\n    return text.split()", "import os", "import os",
             "The cat sat on the mat."]
    v = emb.encode(texts)
    assert v.shape == (4, q.EMBEDDING_DIM) == (4, 384)
    assert np.linalg.norm(v, axis=1) == pytest.approx(np.ones(4), abs=1e-5)
    assert q.cosine(v[1], v[2]) == pytest.approx(1.0, abs=1e-6)
    assert q.cosine(v[0], v[3]) < 0.5  # code and prose are far apart
    assert emb.encode([]).shape == (0, 384)


# ---- TSR ----------------------------------------------------------------------------------------

def test_tsr_is_the_expected_acceptance_of_the_skipped_tokens():
    p = [0.2, 0.5, 0.9, 0.0]
    qx = [0.4, 0.5, 0.3, 0.3]
    assert q.acceptance_terms(p, qx).tolist() == pytest.approx([0.5, 1.0, 1.0, 0.0])
    assert q.tsr(p, qx) == pytest.approx(0.625)
    assert q.tsr([], []) is None
    with pytest.raises(ValueError, match="q"):
        q.tsr([0.1], [0.0])


def test_tsr_matches_simulated_shadow_verification():
    # Known acceptance per token; draw the verifier's accept/reject as speculative sampling does:
    # the accepted share converges to TSR.
    rng = np.random.default_rng(0)
    qx = rng.uniform(0.05, 1, 100_000)
    accept = rng.choice([0.1, 0.6, 1.0], size=qx.size, p=[0.2, 0.3, 0.5])
    p = accept * qx
    expected = 0.2 * 0.1 + 0.3 * 0.6 + 0.5 * 1.0
    assert q.tsr(p, qx) == pytest.approx(expected, abs=0.01)
    accepted = rng.random(qx.size) < np.minimum(1, p / qx)
    assert accepted.mean() == pytest.approx(q.tsr(p, qx), abs=0.005)


# ---- perplexity arithmetic, intervals, the quality block ----------------------------------------

def test_perplexity_is_token_weighted_and_ratio_of_runs():
    assert q.perplexity([2.0, 4.0], [2, 2]) == pytest.approx(math.exp(1.5))
    assert q.perplexity([1.0, 5.0], [1, 5]) == pytest.approx(math.e)  # pooled, not averaged
    assert q.perplexity([0.0], [0]) is None
    assert q.ppl_ratio([2.0], [2], [1.0], [2]) == pytest.approx(math.exp(1 - 0.5))


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(1)
    x = rng.normal(5, 1, 200)
    ci = q.bootstrap_ci(lambda v: v.mean(-1), x)
    assert ci == q.bootstrap_ci(lambda v: v.mean(-1), x)  # fixed seed: reproducible
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))  # the t/normal interval, for scale
    assert ci[0] < x.mean() < ci[1]
    assert (ci[1] - ci[0]) / 2 == pytest.approx(half, rel=0.15)
    assert q.bootstrap_ci(lambda v: v.mean(-1), x[:1]) is None


def scores(seed: int, n: int = 40, shift: float = 0.0, skip: bool = True) -> q.SampleScores:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 30, n)
    nll = tokens * (2.0 + shift + rng.normal(0, 0.1, n))
    outputs = [[int(t) for t in rng.integers(0, 3, 4)] for _ in range(n)]
    p_x = [list(rng.uniform(0, 1, 3)) for _ in range(n)] if skip else None
    q_x = [list(rng.uniform(0.5, 1, 3)) for _ in range(n)] if skip else None
    return q.SampleScores(nll=list(nll), tokens=list(tokens), outputs_t0=outputs,
                          cosine=list(rng.uniform(0.5, 0.9, n)), skipped_p=p_x, skipped_q=q_x)


def test_quality_summary_assembles_every_key_with_intervals():
    ref, run, reseed = scores(0, skip=False), scores(1, shift=0.2), scores(2, skip=False)
    run.outputs_t0 = [o if i % 4 else ref.outputs_t0[i] for i, o in enumerate(run.outputs_t0)]
    out = q.quality_summary(run, reference=ref, reseed=reseed)
    assert set(q.QUALITY_KEYS) <= set(out) and set(out["ci95"]) == set(q.QUALITY_KEYS)
    assert out["ppl_llm"] == pytest.approx(math.exp(sum(run.nll) / sum(run.tokens)))
    assert out["ppl_ratio"] == pytest.approx(out["ppl_llm"] / q.perplexity(ref.nll, ref.tokens))
    assert out["ppl_ratio"] > 1.1  # 0.2 nats per token worse
    terms = np.concatenate([q.acceptance_terms(p, x) for p, x in zip(run.skipped_p,
                                                                       run.skipped_q)])
    assert out["tsr"] == pytest.approx(terms.mean())
    assert out["exact_match_t0"] == pytest.approx(
        q.exact_match_t0(run.outputs_t0, ref.outputs_t0))
    assert out["cosine_to_reference"] == pytest.approx(np.mean(run.cosine))
    assert out["accuracy_ratio"] == pytest.approx(np.mean(run.cosine) / np.mean(ref.cosine))
    for key in q.QUALITY_KEYS:
        lo, hi = out["ci95"][key]
        assert lo - 1e-12 <= out[key] <= hi + 1e-12
    floor = out["noise_floor"]
    assert floor["ppl_ratio"]["ci95"][0] < 1.02 and "tsr" not in floor
    assert out["prompts"] == 40 and "bootstrap" in out["interval"]
    json.dumps(out)  # JSON-ready


def test_llm_only_against_itself_and_missing_inputs():
    ref = scores(0, skip=False)
    out = q.quality_summary(ref, reference=ref)
    assert out["ppl_ratio"] == pytest.approx(1.0) and out["exact_match_t0"] == 1.0
    assert out["ci95"]["ppl_ratio"] == pytest.approx([1.0, 1.0])
    assert out["tsr"] is None and out["noise_floor"] is None  # llm-only skips nothing
    alone = q.quality_summary(q.SampleScores(nll=[3.0, None], tokens=[3, 0]))
    assert alone["ppl_llm"] == pytest.approx(math.e) and alone["ppl_ratio"] is None
    assert alone["ci95"]["ppl_llm"] is None  # one prompt: no interval
    acc = q.quality_summary(q.SampleScores(accuracy=[1, 0, 1, 1]),
                            reference=q.SampleScores(accuracy=[1, 1, 1, 1]))
    assert acc["accuracy_ratio"] == pytest.approx(0.75)


# ---- perplexity under a real model --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llm(tiny_zoo):
    return q.PerplexityScorer(tiny_zoo.llm, batch_size=3)


def test_perplexity_scorer_matches_transformers_directly(tiny_llm, tiny_zoo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_zoo.llm)
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo.llm, dtype=torch.float32).eval()
    prompt, continuation = "def add(a, b):", "\n    return a + b\n"
    p_ids = tok(prompt)["input_ids"]
    c_ids = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    direct = -sum(logp[len(p_ids) + i - 1, t].item() for i, t in enumerate(c_ids))

    nll, n = tiny_llm.score([prompt], [c_ids])
    assert n.tolist() == [len(c_ids)] and nll[0] == pytest.approx(direct, rel=1e-5)
    assert tiny_llm.perplexities([prompt], [continuation]) == pytest.approx(
        [math.exp(direct / len(c_ids))], rel=1e-5)  # text continuation, same tokens
    assert tiny_llm.score([p_ids], [c_ids])[0] == pytest.approx(nll, rel=1e-6)  # ids prompt


def test_perplexity_scorer_batches_like_one_at_a_time(tiny_llm):
    prompts = ["import os", "class A:", "x = [i for i in range(10)]", "def f(", "# a comment"]
    conts = ["\nimport sys\n", "\n    pass\n", "\nprint(x)", "x, y):\n    return x * y", ""]
    batched, n = tiny_llm.score(prompts, conts)
    single = [tiny_llm.score([p], [c])[0][0] for p, c in zip(prompts, conts)]
    assert batched == pytest.approx(single, rel=1e-4) and n[-1] == 0 and batched[-1] == 0
    assert tiny_llm.perplexities(prompts[-1:], conts[-1:]) == [None]
