"""Exactness over blocks, in the verifier's engine: the first 2 and 3 tokens a verifier emits
follow the target's joint distribution p(t1) p(t2 | t1) p(t3 | t1 t2) at T = 1 with top-k AND
top-p, on the paths of the algorithm that one-token tests cannot reach:

- the bonus path: k = 2 drafts, both accepted, then the hook's bonus draw from row n + 1;
- the residual at m > 0: k = 3 drafts, the first accepted, a later one rejected, the
  correction drawn from normalize(max(0, p_m - q_m)) at m >= 1.
(Rollback then redraft needs sessions: `test_verifier_exactness.py`, over the served tier.)

Harness: a real vLLM engine of the tiny LLM with the verifier hook, in process; every round of
all trials goes in one batched `generate` (so the hook also handles many requests per step).
Drafts are drawn by numpy from q (the tiny SLM at another temperature and top-k, or mixtures
with p, see each test); the reference p is transformers' float32 forward on each prefix. Each
trial has its own draw seed (`MASTER_SEED`, trial, round); drafts come from one numpy stream.
Tolerance and power: `helpers.check_joint` (p-value > 0.001 to pass; the same counts must reject
the target at T = 1.25 with p-value < 1e-6).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

from hilm_vllm.verifier.wire import VerifyArgs, VerifyResult
from tests.conftest import vllm_llm
from tests.verifier.helpers import BLOCK_TARGET, CONTEXT, JointModels, check_joint, sparse

EXTENSION = "hilm_vllm.verifier.worker.VerifierWorkerExtension"
MASTER_SEED = 20240611
TARGET = BLOCK_TARGET  # T = 1, top-k 5, top-p 0.9: both masks bind on this prompt
LENGTH = 3  # tokens per trial: pairs are the first two of them
TRIALS = 2000  # per test; ~7-15 s each on 2 busy cores


def draw_seed(trial: int, round_: int) -> int:
    return (MASTER_SEED * 1_000_003 + trial * 64 + round_) % 2**63


# ---- the in-process engine -----------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(tiny_zoo):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # No prefix caching: every trial's rows are computed (prompts are < 1 block anyway).
        engine = vllm_llm(tiny_zoo.llm, worker_extension_cls=EXTENSION,
                          enable_prefix_caching=False, max_num_seqs=256,
                          max_num_batched_tokens=4096)
        assert engine.collective_rpc("hilm_install_verifier") == ["installed"]
        yield engine
        del engine


@pytest.fixture(scope="module")
def models(tiny_zoo):
    return JointModels(tiny_zoo, CONTEXT)


def verify_batch(llm, prompts: list[list[int]], args: list[VerifyArgs]) -> list[tuple]:
    """One batched generate: (emitted token, VerifyResult) per request."""
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input

    params = [SamplingParams(**TARGET.vllm_kwargs(), max_tokens=1, detokenize=False,
                             extra_args=a.to_extra_args()) for a in args]
    outs = llm.generate([tokens_input(p) for p in prompts], params, use_tqdm=False)
    results = [VerifyResult.from_dict(llm.collective_rpc("hilm_pop_verify", args=(a.key,))[0])
               for a in args]
    return [(o.outputs[0].token_ids[0], r) for o, r in zip(outs, results)]


def generate_trials(llm, k: int, q_at, trials: int = TRIALS):
    """Each trial emits >= LENGTH tokens by rounds of k drafts, drafted from q_at(prefix, j)
    (prefix: the tokens after CONTEXT so far, j: index in the block). Returns the first LENGTH
    tokens of every trial, and every round's (n, m)."""
    rng = np.random.default_rng(MASTER_SEED)
    emitted: list[list[int]] = [[] for _ in range(trials)]
    rounds: list[tuple[int, int]] = []
    keys = itertools.count()
    for r in range(LENGTH):
        active = [i for i in range(trials) if len(emitted[i]) < LENGTH]
        if not active:
            break
        prompts, args, drafts = [], [], []
        for i in active:
            draft, dists = [], []
            for j in range(k):
                q = q_at(tuple(emitted[i] + draft), j)
                draft.append(int(rng.choice(q.size, p=q / q.sum())))
                dists.append(sparse(torch.tensor(q, dtype=torch.float32)))
            prompts.append(CONTEXT + emitted[i] + draft)
            args.append(VerifyArgs.build(f"t{next(keys)}", TARGET, draw_seed(i, r), dists))
            drafts.append(draft)
        for i, draft, (token, result) in zip(active, drafts, verify_batch(llm, prompts, args)):
            assert result.error is None, result.error
            m = result.num_accepted
            emitted[i] += [*draft[:m], token]
            rounds.append((k, m))
    return [tuple(e[:LENGTH]) for e in emitted], rounds


def test_bonus_path_pairs_and_triples(llm, models):
    """k = 2, q = 0.9 p + 0.1 q_slm: both drafts accepted in most first rounds, so the third
    token is mostly the bonus (drawn by the hook from row n + 1)."""
    def q_at(prefix, j):
        return 0.9 * models.p(prefix) + 0.1 * models.slm(prefix)

    t0 = time.perf_counter()
    sequences, rounds = generate_trials(llm, 2, q_at)
    bonus = np.mean([m == n for n, m in rounds[:TRIALS]])  # first rounds
    assert bonus > 0.75, f"setup: only {bonus:.2f} of first rounds reach the bonus"
    pvalues = check_joint(models, sequences)
    print(f"bonus path: {bonus:.2f} all accepted, p-values {pvalues}, "
          f"{time.perf_counter() - t0:.1f} s")


def test_residual_after_accepted_drafts_pairs_and_triples(llm, models):
    """k = 3, q = p at the first position (accepted) and the SLM's q after it (acceptance
    ~0.3): most first rounds reject at m = 1 or 2 and draw the correction from the residual
    there."""
    def q_at(prefix, j):
        return models.p(prefix) if j == 0 else models.slm(prefix)

    t0 = time.perf_counter()
    sequences, rounds = generate_trials(llm, 3, q_at)
    first = rounds[:TRIALS]
    residual_late = np.mean([0 < m < n for n, m in first])
    assert residual_late > 0.6, f"setup: only {residual_late:.2f} reject at m > 0"
    pvalues = check_joint(models, sequences)
    print(f"residual at m > 0: {residual_late:.2f} of first rounds, p-values {pvalues}, "
          f"{time.perf_counter() - t0:.1f} s")
