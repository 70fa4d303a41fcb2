"""The worker hook inside a real in-process vLLM engine (tiny LLM), checked against transformers.

The engine's token budget is 64 per step, so a 200-token prompt is prefilled in four chunks and
the rows that predict an 8-token draft straddle two of them.
"""

from __future__ import annotations

import pytest
import torch

from hilm_vllm.sampling import SamplingSpec, processed_probs
from hilm_vllm.verifier.wire import ROWS_CACHED, VerifyArgs, VerifyResult
from hilm_vllm.verifier.worker import check_runner
from tests.conftest import vllm_llm
from tests.verifier.helpers import hf_model

EXTENSION = "hilm_vllm.verifier.worker.VerifierWorkerExtension"
CHUNK = 64
SPEC = SamplingSpec(temperature=0.8, top_k=30)
_keys = iter(range(10**9))


@pytest.fixture(scope="module")
def llm(tiny_zoo):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        engine = vllm_llm(tiny_zoo.llm, worker_extension_cls=EXTENSION,
                          enable_prefix_caching=True, enable_chunked_prefill=True,
                          max_num_batched_tokens=CHUNK)
        assert engine.collective_rpc("hilm_install_verifier") == ["installed"]
        yield engine
        del engine


def verify(llm, prompt, n, spec=SPEC, dists=None, salt=None, skip_cache=False):
    """One verification request -> (emitted token, VerifyResult)."""
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input

    dists = dists or [([x, (x + 1) % 512], [0.5, 0.5]) for x in prompt[len(prompt) - n:]]
    args = VerifyArgs.build(f"k{next(_keys)}", spec, draw_seed=7, dists=dists)
    params = SamplingParams(**spec.vllm_kwargs(), max_tokens=1, detokenize=False,
                            skip_reading_prefix_cache=skip_cache,
                            extra_args=args.to_extra_args())
    out = llm.generate([tokens_input(prompt, cache_salt=salt)], params, use_tqdm=False)[0]
    result = VerifyResult.from_dict(llm.collective_rpc("hilm_pop_verify", args=(args.key,))[0])
    return out.outputs[0].token_ids[0], result


@torch.inference_mode()
def reference_probs(model_dir, prompt, n, spec) -> torch.Tensor:
    """p at the n draft positions [n, V], from transformers over the whole prompt."""
    logits = hf_model(model_dir)(torch.tensor([prompt])).logits[0]  # [L, V]
    return processed_probs(logits[len(prompt) - n - 1:len(prompt) - 1], spec)


@pytest.mark.parametrize("length, n", [(30, 4), (200, 8)])  # one step; draft over two chunks
def test_target_probs_are_the_models_at_the_draft_positions(llm, tiny_zoo, length, n):
    assert llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens == CHUNK
    prompt = [(7 * i + 3) % 500 + 2 for i in range(length)]
    _, result = verify(llm, prompt, n, salt=f"probs-{length}")
    p = reference_probs(tiny_zoo.llm, prompt, n, SPEC)
    expected = p.gather(1, torch.tensor(prompt[-n:])[:, None]).squeeze(1)
    assert result.error is None
    assert torch.allclose(torch.tensor(result.target_probs), expected, rtol=1e-4, atol=1e-6)


def test_greedy_correction_is_what_the_engine_emits(llm, tiny_zoo):
    prompt = [(5 * i + 1) % 500 + 2 for i in range(40)]
    greedy = SamplingSpec(temperature=0.0)
    x0 = int(reference_probs(tiny_zoo.llm, prompt + [0], 1, greedy).argmax())
    fix = int(reference_probs(tiny_zoo.llm, prompt + [x0, 0], 1, greedy).argmax())
    draft = [x0, (fix + 1) % 512, 4]  # the argmax, then a token that is not
    token, result = verify(llm, prompt + draft, 3, greedy, dists=[([x], [1.0]) for x in draft],
                           salt="greedy")
    assert (result.num_accepted, result.recovered, token) == (1, fix, fix)


def test_all_accepted_emits_the_hooks_bonus_the_argmax_at_t0(llm, tiny_zoo):
    prompt = [(3 * i + 2) % 500 + 2 for i in range(40)]
    greedy = SamplingSpec(temperature=0.0)
    x = int(reference_probs(tiny_zoo.llm, prompt + [0], 1, greedy).argmax())
    token, result = verify(llm, prompt + [x], 1, greedy, dists=[([x], [1.0])], salt="bonus")
    bonus = int(reference_probs(tiny_zoo.llm, prompt + [x, 0], 1, greedy).argmax())
    assert (result.num_accepted, result.recovered, token) == (1, None, bonus)


def test_rows_read_from_the_prefix_cache_are_reported_not_guessed(llm):
    prompt = [(11 * i + 5) % 500 + 2 for i in range(64 + 4)]  # context = two full blocks
    assert verify(llm, prompt, 4, salt="cached")[1].error is None
    # Same content again: the cache now covers the context's last token, whose row predicts
    # draft 0, so the forward never computes it.
    assert verify(llm, prompt, 4, salt="cached")[1].error == ROWS_CACHED
    assert verify(llm, prompt, 4, salt="cached", skip_cache=True)[1].error is None


def test_extra_args_round_trip():
    args = VerifyArgs.build("k", SPEC, 123, [([4, 9], [0.25, 0.75]), ([1], [1.0])])
    back = VerifyArgs.from_extra_args(args.to_extra_args())
    assert (back.key, back.n, back.spec, back.draw_seed) == ("k", 2, SPEC, 123)
    assert back.q.ids.tolist() == [4, 9, 1] and back.q.offsets.tolist() == [0, 2, 3]
    assert back.q.probs.tolist() == [0.25, 0.75, 1.0]


def test_install_refuses_a_runner_it_was_not_written_for(llm, monkeypatch):
    import vllm

    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    check_runner(runner)  # the CPU V1 runner passes
    with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        check_runner(object())  # stands for the V2 runner: not a V1 GPUModelRunner
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(RuntimeError, match=r"install vllm==0\.32\.0"):
        check_runner(runner)


def test_a_pushed_result_is_not_kept_and_one_that_could_not_be_pushed_is(llm):
    """The worker keeps a result for hilm_pop_verify only when its push was dropped: a store of
    every result fills to MAX_PENDING (with emitted rows, gigabytes on a real vocabulary)."""
    import msgspec
    import zmq

    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input

    hook = llm.llm_engine.model_executor.driver_worker.worker.model_runner._hilm_verify_hook
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    assert llm.collective_rpc("hilm_install_verifier",
                              args=(f"tcp://127.0.0.1:{port}", "tok")) == ["already installed"]
    try:
        kept_before = len(hook.results)
        keys = []
        for i in range(5):
            prompt = [(13 * j + i) % 500 + 2 for j in range(30)]
            args = VerifyArgs.build(f"pushed{i}", SPEC, 7, [([x], [1.0]) for x in prompt[-3:]])
            keys.append(args.key)
            llm.generate([tokens_input(prompt, cache_salt=f"push{i}")],
                         SamplingParams(**SPEC.vllm_kwargs(), max_tokens=1, detokenize=False,
                                        extra_args=args.to_extra_args()), use_tqdm=False)
        got = []
        while len(got) < 5 and pull.poll(5000):
            token, payload = msgspec.msgpack.decode(pull.recv())
            assert token == "tok"
            got.append(VerifyResult.from_dict(payload))
        assert sorted(r.key for r in got) == sorted(keys)
        assert all(r.error is None for r in got)
        assert len(hook.results) == kept_before  # delivered: nothing kept
        assert llm.collective_rpc("hilm_pop_verify", args=(keys[0],)) == [None]

        hook.sink.send = lambda result: False  # the API process is not reading: dropped
        token, result = verify(llm, [(17 * j) % 500 + 2 for j in range(30)], 3, salt="dropped")
        assert result.error is None  # kept, and fetched by the fallback
    finally:
        hook.sink = None
        pull.close()
