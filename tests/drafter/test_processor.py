"""The uncertainty processor inside a real (in-process) vLLM engine on the tiny zoo's SLM.

A recording subclass keeps a copy of the raw logits the processor saw, so the token, q and u
can be recomputed independently by the pure functions from exactly the same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from hilm_vllm.drafter.processor import (DRAFT_ARG, DraftOptions,
                                         UncertaintyProcessor)
from hilm_vllm.sampling import (NO_TRUNCATION, SamplingSpec, Truncation, draw, processed_probs,
                                seed_uniform, truncate, unpack_row)
from hilm_vllm.seeds import Stream, derive_seed
from hilm_vllm.uncertainty import TOKEN_FREE_GATES, Gate, Perturbation, UncertaintyConfig, perturbed_u
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


def params(n, temperature=0.8, seed=5, top_k=0, top_p=1.0, hook=True, options=None,
           session_seed=SESSION_SEED, **sp):
    """SamplingParams of one draft as the drafter builds them: the request's spec rides in
    DraftOptions (`options`: its other fields; `sp`: SamplingParams ones); `seed` is vLLM's
    own, which must not matter."""
    from vllm import SamplingParams

    extra = None
    if hook:
        opts = DraftOptions(key=f"t{next(_keys)}", seed=session_seed, base=len(CTX),
                            spec=SamplingSpec(temperature, top_k, top_p), **(options or {}))
        extra = {DRAFT_ARG: opts.to_extra_args()}
    return SamplingParams(**({"ignore_eos": True} | sp), temperature=temperature, seed=seed,
                          max_tokens=n, detokenize=False, extra_args=extra)


def run(llm, sps, ctx=CTX):
    """Generate one request per SamplingParams; returns (outputs, readouts or None)."""
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=ctx)] * len(sps), sps, use_tqdm=False)
    readouts = [llm.collective_rpc("hilm_pop_draft", args=(sp.extra_args[DRAFT_ARG]["key"],))[0]
                if sp.extra_args else None for sp in sps]
    return [o.outputs[0] for o in outs], readouts


def expected_row(key: str, pos: int, spec: SamplingSpec, trunc: Truncation = Truncation(),
                 session_seed: int = SESSION_SEED):
    """(token, ids, weights) the processor must have drawn and shipped at `pos`, from its raw
    logits, by the pure functions."""
    ids, w = truncate(processed_probs(RAW[(key, pos)][None], spec), trunc)
    u = torch.tensor([seed_uniform(derive_seed(session_seed, len(CTX) + pos, Stream.DRAFT_DRAW))],
                     dtype=torch.float64)
    token = int(ids[0, draw(w, u)[0]])
    keep = w[0] > 0
    return token, ids[0][keep].tolist(), w[0][keep].tolist()


@pytest.mark.parametrize("perturbation", list(Perturbation))
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_u_equals_the_pure_gate_on_the_same_logits_in_steps_of_one_over_k(engines, perturbation,
                                                                         temperature):
    cfg = UncertaintyConfig(num_samples=20, theta_max=2.0, perturbation=perturbation)
    sp = params(12, temperature, options=dict(uncertainty=cfg))
    (out,), (readout,) = run(engines[0], [sp])
    key = sp.extra_args[DRAFT_ARG]["key"]
    assert readout["tokens"] == list(out.token_ids) and len(readout["u"]) == 12
    for pos, (token, u) in enumerate(zip(out.token_ids, readout["u"])):
        seed = derive_seed(SESSION_SEED, len(CTX) + pos, Stream.PERTURBATION)
        assert u == perturbed_u(RAW[(key, pos)], token, cfg, seed)
        assert 0 <= u <= 1 and round(u * 20) == pytest.approx(u * 20)


@pytest.mark.parametrize("gate", [Gate.ENTROPY, Gate.VAR_ENTROPY, Gate.MAX_PROB])
def test_token_free_gates_equal_the_pure_functions(engines, gate):
    sp = params(6, options=dict(uncertainty=UncertaintyConfig(gate=gate)))
    _, (readout,) = run(engines[0], [sp])
    key = sp.extra_args[DRAFT_ARG]["key"]
    expected = [float(TOKEN_FREE_GATES[gate](RAW[(key, i)][None])[0]) for i in range(6)]
    assert readout["u"] == pytest.approx(expected, abs=1e-6)
    assert all(0 <= u <= 1 for u in expected)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, 0, 1.0), (0.8, 0, 1.0),
                                                       (1.0, 20, 1.0), (0.7, 0, 0.8),
                                                       (1.2, 50, 0.9)])
@pytest.mark.parametrize("trunc", [Truncation(), Truncation(8, 0.05), NO_TRUNCATION])
def test_each_token_is_drawn_from_the_shipped_q_which_is_the_truncated_processed_row(
        engines, temperature, top_k, top_p, trunc):
    spec = SamplingSpec(temperature, top_k, top_p)
    sps = [params(8, temperature, 100 + i, top_k, top_p, options=dict(truncation=trunc))
           for i in range(3)]
    outs, readouts = run(engines[0], sps)
    for sp, out, readout in zip(sps, outs, readouts):
        key = sp.extra_args[DRAFT_ARG]["key"]
        assert readout["tokens"] == list(out.token_ids)
        for pos, token in enumerate(out.token_ids):
            want_token, want_ids, want_w = expected_row(key, pos, spec, trunc)
            ids, w = unpack_row(readout["ids"][pos], readout["probs"][pos])
            assert token == want_token and ids.tolist() == want_ids and w.tolist() == want_w
            assert token in ids.tolist() and abs(float(w.sum()) - 1) < 1e-3
            cap = min(x for x in (trunc.cap or 10**9, top_k or 10**9))
            assert len(ids) <= cap
            if temperature == 0:
                assert ids.tolist() == [token] and w.tolist() == [1.0]
    # vLLM's own seed does not matter: the same session seed gives the same draft
    assert len({tuple(o.token_ids) for o in outs}) == 1


def test_a_rolled_back_position_draws_the_same_token_and_u_again(engines):
    first, (r1,) = run(engines[0], [params(6, 1.0, seed=1)])
    again, (r2,) = run(engines[0], [params(6, 1.0, seed=2)])
    other, _ = run(engines[0], [params(6, 1.0, seed=1, session_seed=12)])
    assert first[0].token_ids == again[0].token_ids and r1["u"] == r2["u"]
    assert other[0].token_ids != first[0].token_ids


def test_drafted_tokens_follow_the_returned_distribution(engines):
    # 1200 one-token drafts with different session seeds from the same context, T = 0.6, top-k
    # 8. Expected counts = the returned q rows (normalised weights); the same counts must
    # clearly fail against the T = 1.2 distribution.
    sps = [params(1, 0.6, top_k=8, session_seed=10_000 + i) for i in range(1200)]
    outs, readouts = run(engines[0], sps)
    key0 = sps[0].extra_args[DRAFT_ARG]["key"]
    support = torch.nonzero(processed_probs(RAW[(key0, 0)][None], SamplingSpec(0.6, 8))[0])
    index = {int(t): i for i, t in enumerate(support.flatten())}
    observed, expected = np.zeros(len(index)), np.zeros(len(index))
    for out, r in zip(outs, readouts):
        observed[index[out.token_ids[0]]] += 1
        ids, w = unpack_row(r["ids"][0], r["probs"][0])
        for t, p in zip(ids, w / w.sum()):
            expected[index[int(t)]] += p
    assert observed.sum() == 1200
    keep = expected > 0
    assert observed[~keep].sum() == 0
    assert stats.chisquare(observed[keep], expected[keep] * 1200 / expected.sum()).pvalue > 1e-3
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
