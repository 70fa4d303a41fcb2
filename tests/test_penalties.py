"""vLLM's sampler transforms as the drafter and verifiers apply them (`sampling.Penalties`,
`processed_probs_batch`): the same numbers as vLLM's own sampler, the order it applies them in,
per-row contexts, and the wire."""

from __future__ import annotations

import math

import pytest
import torch

from hilm_vllm import codec
from hilm_vllm.errors import InvalidArgument
from hilm_vllm.sampling import (Penalties, SamplingSpec, _padded, penalised_logits,
                                processed_probs_batch)

V = 12


def vllm_sampler_probs(logits: torch.Tensor, prompt: list[int], output: list[int],
                       spec: SamplingSpec, pen: Penalties) -> torch.Tensor:
    """One row through vLLM 0.32's own Sampler with the request's SamplingParams (its
    SamplingMetadata built by hand): the processed probabilities it samples from."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.logits_processor.builtin import (LogitBiasLogitsProcessor,
                                                         MinPLogitsProcessor)
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler
    from vllm import SamplingParams

    params = SamplingParams(temperature=spec.temperature, top_k=spec.top_k or 0,
                            min_p=pen.min_p, logit_bias=dict(pen.logit_bias) or None)
    bias = LogitBiasLogitsProcessor(None, torch.device("cpu"), False)
    min_p = MinPLogitsProcessor(_Config(), torch.device("cpu"), False)
    for proc in (bias, min_p):
        proc.update_state(_batch(params, prompt, output))
    allowed = None
    if pen.allowed_token_ids:
        allowed = torch.ones(1, V, dtype=torch.bool)
        allowed[0, list(pen.allowed_token_ids)] = False
    meta = SamplingMetadata(
        temperature=torch.tensor([spec.temperature]), all_greedy=False, all_random=True,
        top_p=None, top_k=torch.tensor([spec.top_k]) if spec.top_k else None, generators={},
        max_num_logprobs=None, no_penalties=not pen.counts_history,
        prompt_token_ids=torch.tensor([prompt]),
        frequency_penalties=torch.tensor([pen.frequency_penalty]),
        presence_penalties=torch.tensor([pen.presence_penalty]),
        repetition_penalties=torch.tensor([pen.repetition_penalty]),
        output_token_ids=[list(output)], allowed_token_ids_mask=allowed,
        bad_words_token_ids={0: [list(w) for w in pen.bad_words]} if pen.bad_words else {},
        logitsprocs=LogitsProcessors([bias, min_p]), spec_token_ids=[[]])
    sampler = Sampler(logprobs_mode="processed_logprobs")
    meta.max_num_logprobs = -1
    out = sampler(logits.clone(), meta)
    return out.logprobs_tensors.logprobs[0].exp()


class _Config:
    class scheduler_config:
        max_num_seqs = 4


def _batch(params, prompt, output):
    from vllm.v1.sample.logits_processor import BatchUpdateBuilder

    b = BatchUpdateBuilder()
    b.added.append((0, params, prompt, output))
    return b.get_and_reset(1)


@pytest.mark.parametrize("pen", [
    Penalties(presence_penalty=0.7, frequency_penalty=0.3, repetition_penalty=1.4),
    Penalties(repetition_penalty=0.8, min_p=0.05),
    Penalties(logit_bias=((3, 2.5), (7, -1.0)), allowed_token_ids=(1, 3, 4, 7, 9)),
    Penalties(presence_penalty=-0.5, logit_bias=((2, 1.0),), min_p=0.2),
    # bad words: 9 always, 4 after a 7 (the output ends with one), 2 after a 5 (it does not)
    Penalties(bad_words=((9,), (7, 4), (5, 2)), presence_penalty=0.3),
])
def test_the_processed_row_is_what_vllms_own_sampler_samples_from(pen):
    torch.manual_seed(0)
    logits = torch.randn(1, V) * 3
    prompt, output = [1, 2, 2, 5], [3, 3, 7]
    spec = SamplingSpec(temperature=0.7, top_k=6, penalties=pen)
    with_output_start = Penalties(**{**pen.__dict__, "output_start": len(prompt)})
    ours = processed_probs_batch(
        logits, [SamplingSpec(0.7, 6, penalties=with_output_start)], [prompt + output])[0]
    theirs = vllm_sampler_probs(logits, prompt, output, spec, pen)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    plain = processed_probs_batch(logits, [SamplingSpec(0.7, 6)])[0]
    assert (ours - plain).abs().max() > 1e-3  # the transforms did something


def test_each_row_counts_its_own_context_and_rows_without_penalties_are_untouched():
    torch.manual_seed(1)
    logits = torch.randn(3, V)
    pen = Penalties(presence_penalty=1.0, repetition_penalty=1.5, output_start=2)
    specs = [SamplingSpec(penalties=pen), SamplingSpec(penalties=pen), SamplingSpec()]
    ctx = [[4, 5, 6], [4, 5, 6, 6, 8], None]
    out = penalised_logits(logits, specs, ctx)
    torch.testing.assert_close(out[2], logits[2])
    for row, c in ((0, ctx[0]), (1, ctx[1])):
        want = logits[row].clone()
        for t in set(c):
            want[t] = want[t] / 1.5 if want[t] > 0 else want[t] * 1.5
        for t in set(c[2:]):
            want[t] -= 1.0
        torch.testing.assert_close(out[row], want)
    with pytest.raises(ValueError, match="context"):
        penalised_logits(logits, specs, None)


def test_bad_words_are_tokenized_and_bounded_as_vllm_does(tiny_zoo):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.tokenizers import get_tokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_zoo.llm))  # the router's
    params = SamplingParams(bad_words=["def", "return x"])
    params.update_from_tokenizer(get_tokenizer(str(tiny_zoo.llm)))  # vLLM's own
    assert codec.bad_words_token_ids(["def", "return x"], tok) == tuple(
        tuple(w) for w in params.bad_words_token_ids)
    assert codec.bad_words_token_ids([], tok) == ()
    with pytest.raises(InvalidArgument, match="max number is 128"):
        codec.bad_words_token_ids([f"w{i}" for i in range(200)], tok)


def test_greedy_takes_the_argmax_after_the_penalties():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    pen = Penalties(repetition_penalty=2.0)  # token 1 was seen: 5 -> 2.5 < 4
    probs = processed_probs_batch(logits, [SamplingSpec(0.0, penalties=pen)], [[1]])
    assert probs[0].argmax() == 2 and probs[0].sum() == 1


def test_values_are_checked_as_vllm_checks_them_and_neutral_values_are_none():
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(min_p=1.5),
                dict(repetition_penalty=0.0), dict(repetition_penalty=math.inf),
                dict(logit_bias=((1, math.nan),))):
        with pytest.raises(ValueError):
            Penalties(**bad)
    assert Penalties(logit_bias=((5, 500.0), (2, -300.0))).logit_bias == ((2, -100.0),
                                                                         (5, 100.0))
    assert SamplingSpec(penalties=Penalties()).penalties is None
    with pytest.raises(ValueError, match="outside the vocabulary"):
        penalised_logits(torch.zeros(1, 4), [SamplingSpec(penalties=Penalties(
            allowed_token_ids=(9,)))])


def test_the_spec_crosses_every_wire_unchanged():
    # values a float32 holds exactly: the wire carries float32 (as vLLM's sampler uses them)
    pen = Penalties(0.5, 0.25, 1.25, 0.125, ((3, 1.5), (8, -2.0)), (1, 3, 8), output_start=17,
                    bad_words=((4,), (2, 6, 9)))
    spec = SamplingSpec(0.75, 5, 0.875, 42, pen)
    assert codec.sampling_from_pb(codec.sampling_to_pb(spec), 16) == spec
    assert codec.sampling_from_dict(codec.sampling_to_dict(spec)) == spec
    with pytest.raises(InvalidArgument, match="bad_words_token_ids has token id 9"):
        codec.sampling_from_pb(codec.sampling_to_pb(SamplingSpec(penalties=Penalties(
            bad_words=((9,),)))), 9)
    with pytest.raises(InvalidArgument, match="a session's field"):
        codec.penalties_from_pb(codec.sampling_to_pb(spec).penalties, 16)  # a Generate's
    plain = SamplingSpec(0.75, 5, 0.875, 42)
    assert not codec.sampling_to_pb(plain).HasField("penalties")
    assert codec.sampling_from_pb(codec.sampling_to_pb(plain)) == plain
    with pytest.raises(InvalidArgument, match="logit_bias"):
        codec.sampling_from_pb(codec.sampling_to_pb(spec), 8)  # token 8 is outside 8 tokens
    pb = codec.sampling_to_pb(spec)
    pb.penalties.bad_words.append("no")
    with pytest.raises(InvalidArgument, match="bad_words"):
        codec.sampling_from_pb(pb, 16)
    pb = codec.sampling_to_pb(spec)
    pb.penalties.presence_penalty = 9
    with pytest.raises(InvalidArgument, match="presence_penalty"):
        codec.sampling_from_pb(pb, 16)
    with pytest.raises(InvalidArgument, match="GenerateRequest.penalties"):
        codec.generate_sampling_from_pb(codec.sampling_to_pb(spec))


def test_the_transforms_keep_their_work_on_the_logits_device():
    """Real `meta` tensors: torch refuses to mix them with CPU operands, as CUDA does. The
    history-free transforms with temperature and top-p (shape-only; top-k and greedy need
    values, see tests/test_device_placement.py); the penalties are vLLM's own
    `apply_penalties` (its GPU sampler's), handed token tensors made on the logits' device."""
    meta = torch.device("meta")
    pen = Penalties(min_p=0.05, logit_bias=((1, 1.0),), allowed_token_ids=(0, 1, 2, 4, 5, 8))
    specs = [SamplingSpec(0.9, penalties=pen), SamplingSpec(1.0, top_p=0.8)]
    out = processed_probs_batch(torch.empty(2, V, device=meta), specs)
    assert out.device == meta and out.shape == (2, V)
    assert _padded([[1, 2], [3]], V, meta).device == meta
