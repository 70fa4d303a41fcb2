"""`VerifyRequest.return_emitted`: each emitted token with the verifier's own sparse p and u.

Real tiers over real gRPC (tiny zoo): an `ilm` tier (A) and an `llm` tier (B), started together.
A Verify that asks for its emitted rows verifies against its p truncated (--emit-top-k 64,
--emit-eps 1e-3: the tier's defaults) and emits exactly that law. Every emitted distribution is
checked against `processed_probs` of transformers' logits at that position, truncated; every
uncertainty against the pure functions of `hilm_vllm.uncertainty` on the same raw row with the
drafter's seed derivation; and the point of it all, the cascade, statistically: a block A
verified, sent on to B as a draft with q = A's emitted row, makes B emit its own p.
"""

from __future__ import annotations

import asyncio
import json
import math
import re

import grpc
import numpy as np
import pytest
import torch

from hilm_vllm.launch import TierProcess
from hilm_vllm.proto.hilm.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from hilm_vllm.sampling import SamplingSpec, processed_probs
from hilm_vllm.seeds import Stream, derive_seed
from hilm_vllm.uncertainty import TOKEN_FREE_GATES, Gate, Perturbation, UncertaintyConfig, perturbed_u
from hilm_vllm.codec import scored_from_pb
from hilm_vllm.verifier.client import VerifierClient
from hilm_vllm.verifier.core import emitted_tokens
from hilm_vllm.verifier.session import VerifyReply
from hilm_vllm.verifier.wire import (EmitArgs, EmittedRow, VerifyArgs, VerifyResult, pack,
                                     unpack)
from tests.conftest import vllm_llm
from tests.verifier.helpers import (ENGINE_FLAGS, SESSION_TTL_S, greedy_draft, hf_model,
                                    next_probs, sparse)
from tests.verifier.test_verifier_exactness import chisquare_pvalue

TIER_K = 10  # tier A runs with --uncertainty-samples 10: requests that say nothing get K = 10
TIER_DEFAULT = UncertaintyConfig(num_samples=TIER_K)
PROMPT = [0, 306, 295, 85, 85, 14, 94, 299, 287, 402, 227, 94, 30, 23]
C = grpc.StatusCode


@pytest.fixture(scope="module")
def tiers(tiny_zoo):
    """(A, B): `--tier ilm` on the tiny ILM and `--tier llm` on the tiny LLM, started at once."""
    flags = [*ENGINE_FLAGS, "--session-ttl-s", str(SESSION_TTL_S)]
    a = TierProcess.start("ilm", ["--model", str(tiny_zoo.ilm), *flags,
                                  "--uncertainty-samples", str(TIER_K)])
    b = TierProcess.start("llm", ["--model", str(tiny_zoo.llm), *flags])
    try:
        a.wait_healthy()
        b.wait_healthy()
        yield a, b
    finally:
        for tier in (a, b):  # both shut down at once: half the wait
            if tier.proc.poll() is None:
                tier.proc.terminate()
        a.stop()
        b.stop()


def run(tier, body):
    async def main():
        async with VerifierClient(tier.grpc_address, "tester") as client:
            return await body(client)

    return asyncio.run(main())


# ---- the reference: transformers' logits, the pure functions ------------------------------------

@torch.inference_mode()
def raw_rows(model_dir, history: list[int], tokens: list[int]) -> torch.Tensor:
    """Raw logits [len(tokens), V] of the rows that predict `tokens` after `history`."""
    logits = hf_model(model_dir)(torch.tensor([history + tokens])).logits[0]
    return logits[len(history) - 1:len(history) - 1 + len(tokens)]


def reference_u(raw: torch.Tensor, cfg: UncertaintyConfig, seed: int, position: int,
                token: int) -> float:
    """u from transformers' raw row by the pure functions, replaying the drafter's noise stream
    (K temperatures, then K uniforms; the gate's law is tested in tests/test_proposal.py), or
    the token-free gate."""
    if cfg.gate is not Gate.PERTURBED:
        return float(TOKEN_FREE_GATES[cfg.gate](raw[None, :])[0])
    return perturbed_u(raw, token, cfg, derive_seed(seed, position, Stream.PERTURBATION))


EMIT_CAP, EMIT_EPS = 64, 1e-3  # the tier's --emit-top-k / --emit-eps defaults


def check_truncated_row(ids: np.ndarray, weights: np.ndarray, p: torch.Tensor) -> None:
    """An emitted row is p truncated (the most likely tokens, at most EMIT_CAP, holding mass
    >= 1 - EMIT_EPS), renormalised, float16 weights: checked against the reference p, allowing
    ties and float noise at the cut (vLLM's logits and transformers' differ in the last bits)."""
    ref = p.double().numpy()
    kept = ref[ids]
    assert len(ids) <= EMIT_CAP and np.array_equal(weights, weights.astype(np.float16))
    others = np.delete(ref, ids)
    assert others.size == 0 or others.max() <= kept.min() + 1e-6, "a likelier token was cut"
    assert len(ids) == EMIT_CAP or kept.sum() >= 1 - EMIT_EPS - 1e-5, "too much mass cut"
    law = weights.astype(np.float64) / weights.sum()
    assert np.allclose(law, kept / kept.sum(), rtol=2e-3, atol=1e-6), "weights differ from p"


def check_emitted(model_dir, history: list[int], append: list[int], draft: list[int],
                  reply: VerifyReply, spec: SamplingSpec, cfg: UncertaintyConfig,
                  seed: int) -> list[int]:
    """Every property of reply.emitted against the reference; returns the new history."""
    m = reply.num_accepted
    tokens = [e.token_id for e in reply.emitted]
    assert tokens == [*draft[:m], reply.next_token]
    context = history + append
    raw = raw_rows(model_dir, context, tokens)  # [m + 1, V]
    p = processed_probs(raw, spec)
    for j, e in enumerate(reply.emitted):
        assert e.ids.dtype == np.int32 and e.probs.dtype == np.float32
        assert len(set(e.ids.tolist())) == len(e.ids) and (e.probs > 0).all()
        assert abs(float(e.probs.astype(np.float64).sum()) - 1) < 1e-3
        assert e.probs[e.ids.tolist().index(e.token_id)] > 0, "emitted token outside its dist"
        check_truncated_row(e.ids, e.probs, p[j])
        expected_u = reference_u(raw[j], cfg, seed, len(context) + j, e.token_id)
        assert e.uncertainty == pytest.approx(expected_u, abs=1e-6), f"emitted[{j}]: u differs"
        assert 0 <= e.uncertainty <= 1
        if cfg.gate is Gate.PERTURBED:
            steps = e.uncertainty * cfg.num_samples
            assert abs(steps - round(steps)) < 1e-4, "u is not a multiple of 1/K"
    return context + tokens


def one_hot(tokens):
    return [([x], [1.0]) for x in tokens]


# ---- what is emitted ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [SamplingSpec(0.8, top_k=30), SamplingSpec(1.0, top_p=0.9),
                                  SamplingSpec(1.3)], ids=["topk", "topp", "full-vocab"])
def test_emitted_tokens_carry_the_verifiers_p_and_u_at_their_positions(tiers, tiny_zoo, spec):
    """Per seeded session, three rounds covering every path: SLM drafts with one-hot q (accepts
    and corrections), A's own p as q (all accepted, then the bonus), an empty block after an
    append (the bonus alone); with the tier's default u, a full override, and a grid one."""
    a, _ = tiers
    override = UncertaintyConfig(num_samples=20, theta_max=1.5)
    grid = UncertaintyConfig(num_samples=8, theta_max=3.0, perturbation=Perturbation.GRID)
    paths = set()

    async def body(c):
        for seed in (1, 2, 3):
            s = await c.open_session(PROMPT, SamplingSpec(spec.temperature, spec.top_k,
                                                          spec.top_p, seed=seed))
            history = list(PROMPT)
            draft = await asyncio.to_thread(greedy_draft, tiny_zoo.slm, history, 4)
            r = await c.verify(s.session_id, len(history), draft, one_hot(draft),
                               want_emitted=True)
            paths.add("corrected" if r.num_accepted < len(draft) else "bonus")
            history = check_emitted(tiny_zoo.ilm, history, [], draft, r, spec, TIER_DEFAULT, seed)
            # q = A's own p: p/q = 1, so every draft token is accepted and the bonus follows
            x1 = int(next_probs(tiny_zoo.ilm, history, spec).argmax())
            x2 = int(next_probs(tiny_zoo.ilm, history + [x1], spec).argmax())
            dists = [sparse(next_probs(tiny_zoo.ilm, history, spec)),
                     sparse(next_probs(tiny_zoo.ilm, history + [x1], spec))]
            r = await c.verify(s.session_id, len(history), [x1, x2], dists, want_emitted=True,
                               uncertainty=override)
            assert r.num_accepted == 2
            paths.add("bonus after drafts")
            history = check_emitted(tiny_zoo.ilm, history, [], [x1, x2], r, spec, override, seed)
            r = await c.verify(s.session_id, len(history), append=[7], want_emitted=True,
                               uncertainty=grid)
            assert r.num_accepted == 0 and len(r.emitted) == 1
            history = check_emitted(tiny_zoo.ilm, history, [7], [], r, spec, grid, seed)
            assert r.position == len(history)
            await c.close_session(s.session_id)

    run(a, body)
    assert "corrected" in paths, "setup: no draft was corrected"


@pytest.mark.parametrize("gate", [Gate.ENTROPY, Gate.VAR_ENTROPY, Gate.MAX_PROB])
def test_token_free_gates_are_the_pure_functions_of_the_raw_row(tiers, tiny_zoo, gate):
    a, _ = tiers
    spec, cfg = SamplingSpec(0.9, top_k=40, seed=5), UncertaintyConfig(gate=gate)

    async def body(c):
        s = await c.open_session(PROMPT, spec)
        draft = await asyncio.to_thread(greedy_draft, tiny_zoo.slm, PROMPT, 4)
        r = await c.verify(s.session_id, s.position, draft, one_hot(draft), want_emitted=True,
                           uncertainty=cfg)
        check_emitted(tiny_zoo.ilm, list(PROMPT), [], draft, r, spec, cfg, 5)
        return r

    run(a, body)


def test_unset_uncertainty_fields_take_the_tiers_flags(tiers, tiny_zoo):
    """A request that sets only theta_max keeps the tier's --uncertainty-samples (10)."""
    a, _ = tiers
    spec = SamplingSpec(1.0, top_k=50, seed=9)

    async def body(c):
        s = await c.open_session(PROMPT, spec)
        draft = await asyncio.to_thread(greedy_draft, tiny_zoo.slm, PROMPT, 3)
        request = verifier_pb2.VerifyRequest(
            session_id=s.session_id, position=s.position, draft_token_ids=draft,
            draft_dists=[common_pb2.SparseDistribution(token_ids=i, probs=p)
                         for i, p in one_hot(draft)],
            return_emitted=True, uncertainty=common_pb2.UncertaintyConfig(theta_max=0.5))
        r = await verifier_pb2_grpc.VerifierStub(c.channel).Verify(request, metadata=c._metadata)
        return draft, VerifyReply(r.num_accepted, r.next_token_id, r.position, (), None,
                                  tuple(scored_from_pb(e) for e in r.emitted))

    draft, r = run(a, body)
    cfg = UncertaintyConfig(num_samples=TIER_K, theta_max=0.5)
    check_emitted(tiny_zoo.ilm, list(PROMPT), [], draft, r, spec, cfg, 9)


def test_greedy_emitted_dists_are_one_hot_on_the_argmax(tiers, tiny_zoo):
    a, _ = tiers
    spec = SamplingSpec(0.0, seed=4)

    async def body(c):
        s = await c.open_session(PROMPT, spec)
        draft = await asyncio.to_thread(greedy_draft, tiny_zoo.slm, PROMPT, 6)
        r = await c.verify(s.session_id, s.position, draft, one_hot(draft), want_emitted=True)
        return draft, r

    draft, r = run(a, body)
    for e in r.emitted:
        assert e.ids.tolist() == [e.token_id] and e.probs.tolist() == [1.0]
    check_emitted(tiny_zoo.ilm, list(PROMPT), [], draft, r, spec, TIER_DEFAULT, 4)
    ours = greedy_draft(tiny_zoo.ilm, PROMPT, len(r.emitted))  # A's own argmax tokens
    assert [e.token_id for e in r.emitted] == ours


def test_nothing_is_emitted_unless_asked(tiers):
    a, _ = tiers

    async def body(c):
        s = await c.open_session(PROMPT, SamplingSpec(0.8, seed=1))
        plain = await c.verify(s.session_id, s.position, [5, 6], one_hot([5, 6]))
        # an uncertainty config alone does not ask for anything
        request = verifier_pb2.VerifyRequest(
            session_id=s.session_id, position=plain.position,
            uncertainty=common_pb2.UncertaintyConfig(num_samples=4))
        raw = await verifier_pb2_grpc.VerifierStub(c.channel).Verify(request,
                                                                     metadata=c._metadata)
        return plain, raw

    plain, raw = run(a, body)
    assert plain.emitted == () and len(raw.emitted) == 0
    assert raw.ByteSize() < 64  # m, token, position, timings: no rows


def test_a_retried_verify_replays_its_emitted_tokens(tiers):
    a, _ = tiers

    async def body(c):
        s = await c.open_session(PROMPT, SamplingSpec(1.0))  # unseeded: reruns would differ
        draft, dists = [5, 6, 7], [([5, 9], [0.5, 0.5]), ([6, 9], [0.5, 0.5]), ([7], [1.0])]
        first = await c.verify(s.session_id, s.position, draft, dists, want_emitted=True)
        again = await c.verify(s.session_id, s.position, draft, dists, want_emitted=True)
        return first, again

    first, again = run(a, body)
    assert len(first.emitted) == first.num_accepted + 1
    for x, y in zip(first.emitted, again.emitted, strict=True):
        assert (x.token_id, x.uncertainty) == (y.token_id, y.uncertainty)
        assert np.array_equal(x.ids, y.ids) and np.array_equal(x.probs, y.probs)


BAD_CONFIGS = [
    (common_pb2.UncertaintyConfig(num_samples=5000), r"num_samples.*\[1, 1024\].*send 0"),
    (common_pb2.UncertaintyConfig(num_samples=-3), r"num_samples.*got -3"),
    (common_pb2.UncertaintyConfig(theta_max=-1.0), r"theta_max must be in \(0, 100\]"),
    (common_pb2.UncertaintyConfig(theta_max=math.nan), r"theta_max.*nan"),
    (common_pb2.UncertaintyConfig(theta_max=math.inf), r"theta_max.*inf"),
    (common_pb2.UncertaintyConfig(gate=42), r"gate 42 is unknown.*UncertaintyGate"),
    (common_pb2.UncertaintyConfig(perturbation=7), r"perturbation 7 is unknown"),
]


def test_a_bad_uncertainty_config_is_invalid_argument_and_the_tier_keeps_serving(tiers):
    a, _ = tiers

    async def body(c):
        stub = verifier_pb2_grpc.VerifierStub(c.channel)
        s = await c.open_session(PROMPT, SamplingSpec(0.8, seed=2))
        errors = []
        for config, _ in BAD_CONFIGS:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Verify(verifier_pb2.VerifyRequest(
                    session_id=s.session_id, position=s.position, draft_token_ids=[5],
                    draft_dists=[common_pb2.SparseDistribution(token_ids=[5], probs=[1.0])],
                    return_emitted=True, uncertainty=config), metadata=c._metadata)
            errors.append(e.value)
        ok = await c.verify(s.session_id, s.position, [5], one_hot([5]), want_emitted=True)
        return errors, ok

    errors, ok = run(a, body)
    for error, (_, pattern) in zip(errors, BAD_CONFIGS):
        assert error.code() == C.INVALID_ARGUMENT, error
        assert re.search(pattern, error.details()), error.details()
    assert len(ok.emitted) == ok.num_accepted + 1  # the session was left where it was


# ---- the cascade: A's emitted block, verified by B with q = A's p ------------------------------

MASTER_SEED = 20260117
P_VALUE = 0.01
TRIALS = 600  # one A session + Verify, one B session + Verify each, 48 at a time: ~30 s
CONCURRENCY = 48
# A held-out context where the tiny ILM and LLM differ enough for the chi-square to tell their
# distributions apart (see the setup test), with top-k 16: 16 bins.
CASCADE_CONTEXT = [0, 278, 457, 227, 278, 424, 20, 8, 287]
TARGET = SamplingSpec(temperature=0.7, top_k=16)  # both verifiers sample with it
DRAFTER = SamplingSpec(temperature=2.0, top_k=24)  # the SLM: flatter and wider, q != p
B_SEED_OFFSET = 10**9  # B's sessions get seeds unrelated to A's (see the report on seeds)


def cascade_setup(zoo):
    p_a = next_probs(zoo.ilm, CASCADE_CONTEXT, TARGET).double().numpy()
    p_b = next_probs(zoo.llm, CASCADE_CONTEXT, TARGET).double().numpy()
    return p_a, p_b


def test_cascade_setup_can_tell_the_two_verifiers_apart(tiny_zoo):
    """Guards the statistical test: B's p differs from A's by far more than the chi-square's
    resolution at TRIALS (a B that passed A's tokens through would fail), and both paths of
    B's decision (accept, residual) are frequent."""
    p_a, p_b = cascade_setup(tiny_zoo)
    assert p_a[p_b == 0].sum() < 0.05
    noncentrality = TRIALS * float(((p_a - p_b) ** 2 / np.where(p_b > 0, p_b, 1)).sum())
    assert noncentrality > 50, noncentrality  # vs a 1% critical value of ~31 for 15 dof
    assert 0.6 < float(np.minimum(p_a, p_b).sum()) < 0.9


def test_cascade_block_verified_by_the_next_tier_follows_its_distribution(tiers, tiny_zoo):
    a, b = tiers
    p_a, p_b = cascade_setup(tiny_zoo)
    rng = np.random.default_rng(MASTER_SEED)
    q1 = next_probs(tiny_zoo.slm, CASCADE_CONTEXT, DRAFTER).double().numpy()
    x1 = rng.choice(q1.size, size=TRIALS, p=q1 / q1.sum())
    q2 = {int(x): next_probs(tiny_zoo.slm, CASCADE_CONTEXT + [int(x)], DRAFTER)
          for x in np.unique(x1)}  # the drafter's second position, per first token
    x2 = []
    for x in x1:
        q = q2[int(x)].double().numpy()
        x2.append(int(rng.choice(q.size, p=q / q.sum())))
    dist1 = sparse(torch.from_numpy(q1).float())

    async def trial(ca, cb, i, gate):
        async with gate:
            sa = await ca.open_session(CASCADE_CONTEXT, SamplingSpec(
                TARGET.temperature, TARGET.top_k, seed=MASTER_SEED + i))
            ra = await ca.verify(sa.session_id, sa.position, [int(x1[i]), x2[i]],
                                 [dist1, sparse(q2[int(x1[i])])], want_emitted=True)
            await ca.close_session(sa.session_id)
            sb = await cb.open_session(CASCADE_CONTEXT, SamplingSpec(
                TARGET.temperature, TARGET.top_k, seed=MASTER_SEED + B_SEED_OFFSET + i))
            rb = await cb.verify(sb.session_id, sb.position, [e.token_id for e in ra.emitted],
                                 [(e.ids, e.probs) for e in ra.emitted])
            await cb.close_session(sb.session_id)
            return ra, rb

    async def main():
        gate = asyncio.Semaphore(CONCURRENCY)
        async with VerifierClient(a.grpc_address) as ca, VerifierClient(b.grpc_address) as cb:
            return await asyncio.gather(*(trial(ca, cb, i, gate) for i in range(TRIALS)))

    results = asyncio.run(main())
    first_a = np.array([ra.emitted[0].token_id for ra, _ in results])
    first_b = np.array([ra.emitted[0].token_id if rb.num_accepted else rb.next_token
                        for ra, rb in results])
    for first, p, name in ((first_a, p_a, "A"), (first_b, p_b, "B")):
        counts = np.bincount(first, minlength=p.size)
        assert counts[p == 0].sum() == 0, f"{name} emitted a token outside its top-k"
        assert chisquare_pvalue(counts, p) > P_VALUE, f"{name}'s first token is not its p"
    alpha = float(np.minimum(p_a, p_b).sum())  # B accepts A's first token with this rate
    accepted = np.mean([rb.num_accepted > 0 for _, rb in results])
    assert abs(accepted - alpha) < 4 * (alpha * (1 - alpha) / TRIALS) ** 0.5, (accepted, alpha)
    assert {len(ra.emitted) for ra, _ in results} == {1, 2, 3}, "every path of A's round"


# ---- inside the worker: no work unless asked; the collective_rpc fallback carries it ------------

EXTENSION = "hilm_vllm.verifier.worker.VerifierWorkerExtension"


@pytest.fixture(scope="module")
def inproc(tiny_zoo):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        engine = vllm_llm(tiny_zoo.llm, worker_extension_cls=EXTENSION,
                          enable_prefix_caching=True)
        assert engine.collective_rpc("hilm_install_verifier") == ["installed"]
        yield engine
        del engine


def test_the_hook_does_no_emitted_work_unless_asked_and_the_fallback_carries_it(
        inproc, tiny_zoo, monkeypatch):
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input

    from hilm_vllm.verifier.worker import VerifyHook

    runner = inproc.llm_engine.model_executor.driver_worker.worker.model_runner
    rows, emitted_calls = [], []
    compute_logits = runner.model.compute_logits
    monkeypatch.setattr(runner.model, "compute_logits",
                        lambda h: rows.append(h.shape[0]) or compute_logits(h))
    emitted = VerifyHook._emitted
    monkeypatch.setattr(VerifyHook, "_emitted",
                        lambda *a: emitted_calls.append(1) or emitted(*a))
    spec = SamplingSpec(0.0)
    draft = greedy_draft(tiny_zoo.llm, PROMPT, 3)  # the LLM's own argmax: all accepted

    def verify(emit, salt):
        args = VerifyArgs.build(f"k-{salt}", spec, 7, one_hot(draft), emit)
        params = SamplingParams(**spec.vllm_kwargs(), max_tokens=1, detokenize=False,
                                extra_args=args.to_extra_args())
        rows.clear()
        out = inproc.generate([tokens_input(PROMPT + draft, cache_salt=salt)], params,
                              use_tqdm=False)[0]
        raw = inproc.collective_rpc("hilm_pop_verify", args=(args.key,))[0]
        return out.outputs[0].token_ids[0], VerifyResult.from_dict(raw), list(rows)

    token, plain, plain_rows = verify(None, "plain")
    assert plain.num_accepted == 3 and plain.emitted == () and emitted_calls == []
    # the hook's n + 1 rows (the draft's and the bonus token's), the sampler's one
    assert sum(plain_rows) == len(draft) + 2
    cfg = UncertaintyConfig(num_samples=16)
    token2, asked, asked_rows = verify(EmitArgs(cfg, 123), "asked")
    assert token2 == token and asked.num_accepted == 3 and emitted_calls == [1]
    assert sum(asked_rows) == sum(plain_rows)  # the bonus row is computed anyway
    reply = VerifyReply(3, token, 0, (), None, emitted_tokens(asked, [*draft, token]))
    check_emitted(tiny_zoo.llm, list(PROMPT), [], draft, reply, spec, cfg, 123)


def test_emitted_rows_survive_both_transports():
    """The ZMQ channel carries JSON, collective_rpc plain values: both keep rows bit-exact."""
    ids, probs = np.array([3, 70, 511], np.int32), np.array([0.25, 0.5, 0.25], np.float16)
    result = VerifyResult("k", 1, None, (0.5,), emitted=(EmittedRow(70, 0.35, pack(ids, "<i4"),
                                                                    pack(probs, "<f2")),))
    back = VerifyResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back == result
    assert unpack(back.emitted[0].ids, "<i4").tolist() == ids.tolist()
    assert unpack(back.emitted[0].probs, "<f2").tobytes() == probs.tobytes()
    from hilm_vllm.sampling import Truncation

    args = VerifyArgs.build("k", SamplingSpec(0.5), 1, [([4], [1.0])],
                            EmitArgs(UncertaintyConfig(Gate.MAX_PROB, 7, 1.5), 99,
                                     Truncation(8, 0.01)))
    assert VerifyArgs.from_extra_args(args.to_extra_args()).emit == args.emit
    assert VerifyArgs.from_extra_args(
        VerifyArgs.build("k", SamplingSpec(0.5), 1, []).to_extra_args()).emit is None


def test_tier_flags_set_the_default_uncertainty():
    import argparse

    from hilm_vllm.verifier.tier import add_cli_args, settings_from_args

    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    assert settings_from_args(parser.parse_args([])).uncertainty == UncertaintyConfig()
    settings = settings_from_args(parser.parse_args(
        ["--uncertainty-gate", "entropy", "--uncertainty-samples", "8", "--theta-max", "1.5",
         "--perturbation", "grid"]))
    assert settings.uncertainty == UncertaintyConfig(Gate.ENTROPY, 8, 1.5, Perturbation.GRID)
    from hilm_vllm.sampling import Truncation

    assert settings.emit_truncation == Truncation(EMIT_CAP, EMIT_EPS)
    assert settings_from_args(parser.parse_args(["--emit-top-k", "16", "--emit-eps", "0.01"])
                              ).emit_truncation == Truncation(16, 0.01)
    with pytest.raises(SystemExit, match="eps"):
        settings_from_args(parser.parse_args(["--emit-eps", "1"]))
    with pytest.raises(SystemExit, match="num_samples"):
        settings_from_args(parser.parse_args(["--uncertainty-samples", "0"]))
