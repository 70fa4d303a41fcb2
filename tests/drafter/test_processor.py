"""The uncertainty processor inside a real (in-process) vLLM engine on the tiny zoo's SLM.

A recording subclass keeps a copy of the raw logits the processor saw, so u and q can be
recomputed independently (numpy, `processed_probs`) from exactly the same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from hilm_vllm.drafter.processor import (DRAFT_ARG, DraftOptions,
                                         UncertaintyProcessor)
from hilm_vllm.sampling import SamplingSpec, processed_probs
from hilm_vllm.seeds import Stream, derive_seed
from hilm_vllm.uncertainty import (TOKEN_FREE_GATES, Gate, Perturbation, UncertaintyConfig,
                                   temperatures)
from tests.conftest import vllm_llm

WORKER_EXT = "hilm_vllm.drafter.worker.DrafterWorkerExtension"
SESSION_SEED = 11
RAW: dict[tuple[str, int], torch.Tensor] = {}  # (key, position) -> raw logits [V]


class RecordingProcessor(UncertaintyProcessor):
    def apply(self, logits):
        for row, draft in self.rows.items():
            RAW[(draft.options.key, len(draft.output_ids))] = logits[row].clone()
        return super().apply(logits)


@pytest.fixture(scope="module")
def engines(tiny_zoo):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        hooked = vllm_llm(tiny_zoo.slm, logits_processors=[RecordingProcessor],
                          worker_extension_cls=WORKER_EXT, max_num_seqs=64)
        # The step hook, without a push channel: finished drafts are kept for hilm_pop_draft.
        assert hooked.collective_rpc("hilm_install_drafter") == ["installed"]
        plain = vllm_llm(tiny_zoo.slm)
        yield hooked, plain
        del hooked, plain


@pytest.fixture(scope="module")
def eos(tiny_zoo):
    import json

    return json.loads((tiny_zoo.slm / "config.json").read_text())["eos_token_id"]


CTX = [5, 17, 99, 250, 3, 42, 42, 7, 300, 12, 64, 128, 9, 33, 401, 77]
_keys = iter(range(10**9))


def params(n, temperature=0.8, seed=5, top_k=0, top_p=1.0, hook=True, options=None, **sp):
    """SamplingParams of one draft (`options`: DraftOptions fields; `sp`: SamplingParams ones)."""
    from vllm import SamplingParams

    extra = None
    if hook:
        opts = DraftOptions(key=f"t{next(_keys)}", seed=SESSION_SEED, base=len(CTX),
                            **(options or {}))
        extra = {DRAFT_ARG: opts.to_extra_args()}
    return SamplingParams(**({"ignore_eos": True} | sp), temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, max_tokens=n, detokenize=False,
                          extra_args=extra)


def run(llm, sps, ctx=CTX):
    """Generate one request per SamplingParams; returns (outputs, readouts or None)."""
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=ctx)] * len(sps), sps, use_tqdm=False)
    readouts = [llm.collective_rpc("hilm_pop_draft", args=(sp.extra_args[DRAFT_ARG]["key"],))[0]
                if sp.extra_args else None for sp in sps]
    return [o.outputs[0] for o in outs], readouts


def numpy_u(raw: torch.Tensor, cfg: UncertaintyConfig, position: int, token: int) -> float:
    """u recomputed in numpy from the raw logits, replaying the processor's noise stream."""
    g = torch.Generator().manual_seed(derive_seed(SESSION_SEED, len(CTX) + position, Stream.PERTURBATION))
    thetas = temperatures(cfg, g).numpy()  # replay the draws: K temperatures, then K uniforms
    uniforms = torch.rand(cfg.num_samples, generator=g, dtype=torch.float64).numpy()
    z = raw.double().numpy()
    cdf = np.cumsum(np.exp((z - z.max())[None, :] * (1 / thetas)[:, None]), axis=-1)
    samples = [np.searchsorted(c, r * c[-1], side="right") for c, r in zip(cdf, uniforms)]
    return float(np.mean(np.array(samples) != token))


@pytest.mark.parametrize("perturbation", list(Perturbation))
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_u_equals_numpy_on_the_same_logits_in_steps_of_one_over_k(engines, perturbation,
                                                                    temperature):
    cfg = UncertaintyConfig(num_samples=20, theta_max=2.0, perturbation=perturbation)
    sp = params(12, temperature, options=dict(uncertainty=cfg))
    (out,), (readout,) = run(engines[0], [sp])
    key = sp.extra_args[DRAFT_ARG]["key"]
    assert readout["tokens"] == list(out.token_ids) and len(readout["u"]) == 12
    for pos, (token, u) in enumerate(zip(out.token_ids, readout["u"])):
        assert u == numpy_u(RAW[(key, pos)], cfg, pos, token)
        assert 0 <= u <= 1 and round(u * 20) == pytest.approx(u * 20)


@pytest.mark.parametrize("gate", [Gate.ENTROPY, Gate.VAR_ENTROPY, Gate.MAX_PROB])
def test_token_free_gates_equal_the_pure_functions(engines, gate):
    sp = params(6, options=dict(uncertainty=UncertaintyConfig(gate=gate)))
    _, (readout,) = run(engines[0], [sp])
    key = sp.extra_args[DRAFT_ARG]["key"]
    expected = [float(TOKEN_FREE_GATES[gate](RAW[(key, i)][None])[0]) for i in range(6)]
    assert readout["u"] == expected and all(0 <= u <= 1 for u in expected)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, 0, 1.0), (0.8, 0, 1.0),
                                                       (1.0, 20, 1.0), (0.7, 0, 0.8),
                                                       (1.2, 50, 0.9)])
def test_drafted_tokens_are_identical_with_the_hook_on_and_off(engines, temperature, top_k,
                                                               top_p):
    hooked, plain = engines
    seeds = [1, 2, 3]
    on, _ = run(hooked, [params(16, temperature, s, top_k, top_p) for s in seeds])
    off, _ = run(plain, [params(16, temperature, s, top_k, top_p, hook=False) for s in seeds])
    assert [o.token_ids for o in on] == [o.token_ids for o in off]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, 0, 1.0), (0.8, 0, 1.0),
                                                       (1.0, 20, 1.0), (0.7, 0, 0.8)])
def test_sparse_q_is_exactly_the_sampler_distribution_and_holds_the_token(engines, temperature,
                                                                          top_k, top_p):
    sp = params(8, temperature, top_k=top_k, top_p=top_p)
    (out,), (readout,) = run(engines[0], [sp])
    spec = SamplingSpec(temperature, top_k, top_p)
    key = sp.extra_args[DRAFT_ARG]["key"]
    for pos, token in enumerate(out.token_ids):
        ids = np.frombuffer(readout["ids"][pos], dtype=np.int32).copy()
        probs = np.frombuffer(readout["probs"][pos], dtype=np.float32).copy()
        q = processed_probs(RAW[(key, pos)][None], spec)[0]
        assert ids.tolist() == torch.nonzero(q > 0).flatten().tolist()
        assert probs.tolist() == q[ids].tolist()
        assert probs.sum() == pytest.approx(1.0, abs=1e-5) and token in ids.tolist()
        if top_k:
            assert len(ids) <= top_k
        if temperature == 0:
            assert ids.tolist() == [token] and probs.tolist() == [1.0]


def test_drafted_tokens_follow_the_returned_distribution(engines):
    # 1200 one-token drafts with different seeds from the same context, T = 0.6, top-k 8.
    # Expected counts = sum of the returned q rows (they may differ in the last bits between
    # batches); the same counts must clearly fail against the T = 1.2 distribution.
    sps = [params(1, 0.6, seed=10_000 + i, top_k=8) for i in range(1200)]
    outs, readouts = run(engines[0], sps)
    key0 = sps[0].extra_args[DRAFT_ARG]["key"]
    support = torch.nonzero(processed_probs(RAW[(key0, 0)][None], SamplingSpec(0.6, 8))[0])
    index = {int(t): i for i, t in enumerate(support.flatten())}
    observed, expected = np.zeros(len(index)), np.zeros(len(index))
    for out, r in zip(outs, readouts):
        observed[index[out.token_ids[0]]] += 1
        ids, probs = np.frombuffer(r["ids"][0], np.int32), np.frombuffer(r["probs"][0], np.float32)
        for t, p in zip(ids, probs):
            expected[index[int(t)]] += p
    expected *= observed.sum() / expected.sum()
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    wrong = processed_probs(RAW[(key0, 0)][None], SamplingSpec(1.2, 8))[0][support.flatten()]
    wrong = wrong.double().numpy()
    wrong *= observed.sum() / wrong.sum()
    assert stats.chisquare(observed, wrong).pvalue < 1e-4


def test_early_stop_returns_tokens_up_to_the_first_uncertain_one(engines, eos):
    bound = 0.9
    full_sp = params(24, 0.8, seed=21)
    (full,), (full_read,) = run(engines[0], [full_sp])
    first = next((i for i, u in enumerate(full_read["u"]) if u > bound), None)
    assert first is not None and first < 23, "the tiny model should have an uncertain token"
    assert eos not in full.token_ids[:first + 1]
    stop = dict(stop_token_ids=[eos])  # what the drafter sets when it draws early stops
    (out,), (read,) = run(engines[0], [params(24, 0.8, seed=21, **stop, options=dict(
        stop_uncertainty=bound, stop_token=eos))])
    assert read["forced_stop"] == first + 1
    assert read["tokens"] == list(full.token_ids[:first + 1])
    assert read["u"] == full_read["u"][:first + 1]
    assert list(out.token_ids) == read["tokens"] + [eos] and out.finish_reason == "stop"
    (_, ), (never,) = run(engines[0], [params(24, 0.8, seed=21, **stop, options=dict(
        stop_uncertainty=1.0, stop_token=eos))])
    assert never["forced_stop"] is None and len(never["tokens"]) == 24


def test_parameters_that_would_break_q_are_refused(engines):
    from vllm.exceptions import VLLMValidationError

    for bad in (dict(presence_penalty=0.5), dict(repetition_penalty=1.3), dict(min_p=0.1)):
        with pytest.raises(VLLMValidationError, match="not be exact"):
            run(engines[0], [params(2, **bad)])
    out, _ = run(engines[0], [params(2)])  # the engine keeps serving
    assert len(out[0].token_ids) == 2
