"""Structured outputs on a session's rows (hilm_vllm/server/grammar.py, sampling.apply_bitmask):
vLLM's xgrammar backend on the tiny family's tokenizer, no engine."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from hilm_vllm import codec
from hilm_vllm.errors import InvalidArgument
from hilm_vllm.sampling import SamplingSpec, Structured, apply_bitmask, bitmask_allowed
from hilm_vllm.server import grammar
from hilm_vllm.server.grammar import RowGrammars


@pytest.fixture(scope="module")
def tokenizer(tiny_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_zoo.llm))


def config(vocab: int, backend: str = "xgrammar", whitespace: bool = True):
    """The parts of a VllmConfig the backend reads."""
    model = SimpleNamespace(get_vocab_size=lambda: vocab, skip_tokenizer_init=False,
                            hf_config=SimpleNamespace(model_type="llama"))
    return SimpleNamespace(model_config=model, speculative_config=None,
                           structured_outputs_config=SimpleNamespace(
                               backend=backend, disable_any_whitespace=whitespace))


@pytest.fixture
def grammars(tokenizer):
    return RowGrammars(config(len(tokenizer)), tokenizer)


def constraint(tokenizer, start: int = 0, **params) -> Structured:
    return Structured(json.dumps(params), start, (tokenizer.eos_token_id,))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def allowed(grammars, tokenizer, st: Structured, context: list[int], session="s") -> set[int]:
    mask = grammars.bitmask([(session, st, context)])
    return set(torch.nonzero(bitmask_allowed(mask, len(tokenizer))[0]).flatten().tolist())


def test_bitmask_layout_is_xgrammars():
    import xgrammar as xgr

    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    mask = torch.randint(-2**31, 2**31 - 1, (2, 4), dtype=torch.int32)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, torch.cat([torch.full((1, 4), -1, dtype=torch.int32),
                                                         mask]))
    got = apply_bitmask(logits, torch.tensor([1, 2]), mask)
    assert torch.equal(got, expected)
    assert torch.equal(logits[0], got[0])  # the input is not modified, other rows untouched


def test_apply_bitmask_keeps_the_logits_device():
    logits = torch.empty(4, 70, device="meta")
    out = apply_bitmask(logits, torch.tensor([0, 3]), torch.zeros(2, 3, dtype=torch.int32))
    assert out.device.type == "meta" and out.shape == (4, 70)


def test_rows_follow_the_output_from_output_start(grammars, tokenizer):
    prompt = ids(tokenizer, "xyz 123")
    st = constraint(tokenizer, len(prompt), regex="ab[0-9]")
    first = allowed(grammars, tokenizer, st, prompt)
    assert ids(tokenizer, "a")[0] in first and ids(tokenizer, "b")[0] not in first
    after_a = allowed(grammars, tokenizer, st, prompt + ids(tokenizer, "a"))
    assert after_a == {ids(tokenizer, "b")[0]}
    done = allowed(grammars, tokenizer, st, prompt + ids(tokenizer, "ab7"))
    assert done == {tokenizer.eos_token_id}  # the grammar's end: only its stop token


def test_a_rollback_gives_the_masks_of_a_fresh_session(grammars, tokenizer):
    """A tracker cut back (rejected drafts) and advanced on other tokens gives every row the
    mask a new session gives; so does one whose session hopped between contexts."""
    st = constraint(tokenizer, 0, json={"type": "object", "properties": {
        "k": {"type": "string"}}, "required": ["k"]})
    path = ids(tokenizer, '{"k":"abc"}')
    other = ids(tokenizer, '{"k":"xy')
    for n in range(len(other) + 1):  # a drafted path, then rolled back onto another
        allowed(grammars, tokenizer, st, other[:n], "s")
    for n in range(len(path) + 1):
        assert allowed(grammars, tokenizer, st, path[:n], "s") == \
            allowed(grammars, tokenizer, st, path[:n], f"fresh-{n}")


def test_rows_after_a_refused_or_final_token_allow_everything(grammars, tokenizer):
    st = constraint(tokenizer, 0, regex="[a-c]")
    everything = set(range(len(tokenizer)))
    assert allowed(grammars, tokenizer, st, ids(tokenizer, "z")) == everything
    assert allowed(grammars, tokenizer, st, ids(tokenizer, "a") + [tokenizer.eos_token_id]) \
        == everything
    assert allowed(grammars, tokenizer, st, []) == {ids(tokenizer, c)[0] for c in "abc"}


def test_choice_goes_through_vllms_validation(grammars, tokenizer):
    st = constraint(tokenizer, 0, choice=["yes", "no"])
    first = allowed(grammars, tokenizer, st, [])
    assert ids(tokenizer, "y")[0] in first and ids(tokenizer, "n")[0] in first
    assert ids(tokenizer, "m")[0] not in first


def test_check_refuses_what_vllm_refuses_and_other_backends(tokenizer):
    ok = constraint(tokenizer, 0, regex="a+")
    grammar.check(ok, config(len(tokenizer)))
    grammar.check(None, config(len(tokenizer), backend="guidance"))  # nothing asked
    with pytest.raises(InvalidArgument, match="structured output"):
        grammar.check(constraint(tokenizer, 0, regex="(unclosed"), config(len(tokenizer)))
    with pytest.raises(InvalidArgument, match="backend 'guidance'"):
        grammar.check(ok, config(len(tokenizer), backend="guidance"))
    engine = SimpleNamespace(vllm_config=config(len(tokenizer)))
    spec = grammar.for_session(SamplingSpec(structured=Structured('{"regex":"a"}', 3)),
                               engine, (9, 1))
    assert grammar.for_session(SamplingSpec(0.5), None, (1,)) == SamplingSpec(0.5)
    assert spec.structured.stop_token_ids == (1, 9) and spec.structured.output_start == 3


def test_the_constraint_on_the_wire():
    st = codec.structured_spec({"json": {"type": "object"}}, 5)
    spec = SamplingSpec(0.5, structured=st)
    assert codec.sampling_from_pb(codec.sampling_to_pb(spec)) == spec
    assert codec.sampling_from_dict(codec.sampling_to_dict(spec)) == spec
    with_stops = SamplingSpec(0.5, structured=Structured(st.params, 5, (2,)))
    assert codec.sampling_from_dict(codec.sampling_to_dict(with_stops)) == with_stops
    pb = codec.sampling_to_pb(spec)
    pb.structured.params = '{"nope": 1}'
    with pytest.raises(InvalidArgument, match="structured_outputs.nope"):
        codec.sampling_from_pb(pb)
    pb.structured.params = "{"
    with pytest.raises(InvalidArgument, match="sampling.structured.params is not JSON"):
        codec.sampling_from_pb(pb)
    with pytest.raises(InvalidArgument, match="GenerateRequest.structured_outputs"):
        codec.generate_sampling_from_pb(codec.sampling_to_pb(spec))


def test_a_schemas_property_order_is_kept(grammars, tokenizer):
    """xgrammar generates an object's properties in the schema's order (as vLLM's backend sees
    the request's schema): the wire must not reorder them."""
    schema = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "integer"}},
              "required": ["z", "a"], "additionalProperties": False}
    st = codec.structured_spec({"json": schema}, 0)
    st = Structured(st.params, 0, (tokenizer.eos_token_id,))
    after = allowed(grammars, tokenizer, st, ids(tokenizer, '{"'))
    assert ids(tokenizer, "z")[0] in after and ids(tokenizer, "a")[0] not in after
