"""`hilm bench round-cost`: the pure parts of the context and vocabulary scans (prompts of
exactly N ids, keys, ratios, skipped families, flags, configs). No engines."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from hilm_vllm.lab.bench import round_cost as rc


def test_a_context_has_exactly_n_ids_head_first_then_the_body_repeated():
    assert rc.context_ids([0], [5, 6, 7], 1) == [0]
    assert rc.context_ids([0], [5, 6, 7], 8) == [0, 5, 6, 7, 5, 6, 7, 5]
    assert rc.context_ids([], [5, 6], 5) == [5, 6, 5, 6, 5]
    ids = rc.context_ids([0], list(range(10, 300)), 1900)
    assert len(ids) == 1900 and ids[0] == 0 and ids[1:3] == [10, 11]
    assert ids.count(0) == 1  # the BOS is not repeated with the body


def test_a_context_refuses_what_it_cannot_fill():
    with pytest.raises(ValueError):
        rc.context_ids([0], [5], 0)
    with pytest.raises(ValueError, match="no tokens"):
        rc.context_ids([0], [], 3)
    assert rc.context_ids([0], [], 1) == [0]


def test_keys_are_the_numbers_as_strings_ascending():
    assert rc.keyed({1900: 2.0, 16: 1.0}) == {"16": 1.0, "1900": 2.0}
    assert list(rc.keyed({128256: 3.0, 272: 1.0, 32000: 2.0})) == ["272", "32000", "128256"]


def test_the_context_ratio_is_the_longest_over_the_shortest():
    assert rc.context_ratio({"16": 10.0, "1900": 12.0}) == pytest.approx(1.2)
    assert rc.context_ratio({"1900": 30.0, "400": 20.0, "16": 10.0}) == pytest.approx(3.0)
    assert rc.context_ratio({"16": 10.0}) is None
    assert rc.context_ratio({}) is None


def test_vocab_ratios_divide_by_272_when_measured_else_the_smallest_vocabulary():
    by = {"272": 10.0, "32000": 15.0, "128256": 30.0}
    assert rc.vocab_base(by) == "272"
    assert rc.ratios(by, "272") == pytest.approx({"272": 1.0, "32000": 1.5, "128256": 3.0})
    assert rc.vocab_base({"32000": 4.0, "512": 2.0}) == "512"
    assert rc.vocab_base({}) is None and rc.ratios({}, None) == {}


def test_unknown_families_are_skipped_with_a_reason():
    known = ["demo", "tiny", "vocab32k"]
    assert rc.family_skip_reason("demo", known) is None
    reason = rc.family_skip_reason("vocab128k", known)
    assert "not a zoo family" in reason and "vocab32k" in reason


def test_a_repeated_vocabulary_size_is_skipped_keeping_the_first_family():
    keys, skipped = rc.assign_vocab_keys({"demo": 272, "other": 272, "vocab32k": 32000})
    assert keys == {"272": "demo", "32000": "vocab32k"}
    assert list(skipped) == ["other"] and "demo" in skipped["other"]


def run(size, draft, verify, draft_bytes=100, verify_bytes=200):
    """run_family's shape, for one family measured at the vocab part's context."""
    at = {"draft_ms_idle": draft, "verify_ms_idle": verify, "verify_ms_after_draft": verify,
          "samples": {}, "context_tokens": rc.VOCAB_CONTEXT, "draft_reply_bytes": draft_bytes,
          "verify_request_bytes": verify_bytes}
    return {"family": "f", "vocab_size": size, "contexts": {str(rc.VOCAB_CONTEXT): at}}


def test_vocab_results_keys_ratios_bytes_and_skipped_families():
    runs = {"vocab128k": run(128256, 40.0, 60.0, 900, 1800), "demo": run(272, 10.0, 20.0),
            "vocab32k": run(32000, 20.0, 30.0)}
    out = rc.vocab_results(runs, {"missing": "not a zoo family"})
    assert list(out["draft_ms_by_vocab"]) == ["272", "32000", "128256"]
    assert out["verify_ms_by_vocab"] == {"272": 20.0, "32000": 30.0, "128256": 60.0}
    assert out["vocab_ratio_base"] == "272"
    assert out["draft_vocab_ratio"] == pytest.approx({"272": 1.0, "32000": 2.0, "128256": 4.0})
    assert out["verify_vocab_ratio"]["128256"] == pytest.approx(3.0)
    assert out["draft_reply_bytes_by_vocab"]["128256"] == 900
    assert out["verify_request_bytes_by_vocab"] == {"272": 200, "32000": 200, "128256": 1800}
    assert out["vocab_families"] == {"272": "demo", "32000": "vocab32k", "128256": "vocab128k"}
    assert out["skipped_families"] == {"missing": "not a zoo family"}


def test_vocab_results_without_wire_sizes_or_families():
    out = rc.vocab_results({"tiny": run(512, 5.0, 8.0, None, None)}, {})
    assert "draft_reply_bytes_by_vocab" not in out and "verify_request_bytes_by_vocab" not in out
    assert out["draft_vocab_ratio"] == {"512": 1.0}
    empty = rc.vocab_results({}, {"demo": "why"})
    assert empty["draft_ms_by_vocab"] == {} and empty["vocab_ratio_base"] is None
    assert empty["skipped_families"] == {"demo": "why"}


def test_context_results_keep_the_asked_contexts_only():
    at = {n: {"draft_ms_idle": d, "verify_ms_idle": v} for n, d, v in
          (("16", 10.0, 20.0), ("400", 11.0, 21.0), ("1900", 15.0, 30.0))}
    out = rc.context_results({"family": "demo", "contexts": at}, [16, 1900])
    assert out["draft_ms_by_context"] == {"16": 10.0, "1900": 15.0}
    assert out["verify_ms_by_context"] == {"16": 20.0, "1900": 30.0}
    assert out["verify_context_ratio"] == pytest.approx(1.5)
    assert out["draft_context_ratio"] == pytest.approx(1.5)
    assert out["context_family"] == "demo" and list(out["context_detail"]) == ["16", "1900"]


def test_flags_defaults_and_errors(capsys):
    args = rc.parse_args([])
    assert args.only == "all" and rc.parts_to_run(args.only) == ["settings", "context", "vocab"]
    assert args.context_list == [16, 1900]
    assert args.family_list == ["demo", "vocab32k", "vocab128k"]
    args = rc.parse_args(["--only", "vocab", "--vocab-families", "tiny", "--contexts", "16,16,400"])
    assert rc.parts_to_run(args.only) == ["vocab"] and args.family_list == ["tiny"]
    assert args.context_list == [16, 400]
    for bad in (["--contexts", "16,x"], ["--contexts", "0"], ["--only", "nope"],
                ["--vocab-families", ","]):
        with pytest.raises(SystemExit):
            rc.parse_args(bad)


def test_a_context_too_long_for_max_model_len_says_what_fits():
    assert rc.context_error([16, 1900], 4, 2048, "demo-llm.yaml") is None
    error = rc.context_error([16, 1900], 4, 1024, "tiny-llm.yaml")
    assert "1900" in error and "1024" in error and "up to 1019" in error
    assert rc.context_error([16, 1019], 4, 1024, "x") is None
    assert rc.context_error([5000], 4, None, "x") is None


def test_engine_configs_are_the_family_s_and_set_max_model_len(tmp_path):
    assert rc.engine_config("tiny", "llm").name == "tiny-llm.yaml"
    assert rc.engine_config("no-such-family", "slm").name == "demo-slm.yaml"
    assert rc.config_max_model_len(rc.engine_config("demo", "llm")) == 2048
    (tmp_path / "c.yaml").write_text("dtype: float32\n")
    assert rc.config_max_model_len(tmp_path / "c.yaml") is None
    assert rc.config_max_model_len(tmp_path / "missing.yaml") is None


def test_the_vocabulary_size_is_read_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 32000}))
    assert rc.vocab_size(tmp_path) == 32000
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="vocab_size"):
        rc.vocab_size(tmp_path)


def tok(token_id, ids, probs):
    return SimpleNamespace(token_id=token_id, ids=ids, probs=probs)


def test_a_variant_swaps_the_last_token_that_has_another_in_its_support():
    drafted = SimpleNamespace(tokens=[tok(1, [1, 2], [0.6, 0.4]), tok(3, [3, 4], [0.9, 0.1])])
    assert [t for t, _ in rc.variant(drafted)] == [1, 4]
    sure_last = SimpleNamespace(tokens=[tok(1, [1, 2], [0.6, 0.4]), tok(3, [3], [1.0])])
    assert [t for t, _ in rc.variant(sure_last)] == [2, 3]
    all_sure = SimpleNamespace(tokens=[tok(1, [1], [1.0]), tok(3, [3], [1.0])])
    assert [t for t, _ in rc.variant(all_sure)] == [1, 3]


def test_wire_sizes_are_the_messages_serialized_sizes():
    from hilm_vllm.proto.hilm.v1 import drafter_pb2, verifier_pb2

    calls = []

    async def draft(request, **kw):
        calls.append(kw)
        return drafter_pb2.DraftResponse(position=7)

    async def verify(request, **kw):
        return verifier_pb2.VerifyResponse()

    slm = SimpleNamespace(_stub=SimpleNamespace(Draft=draft))
    llm = SimpleNamespace(_verifier=SimpleNamespace(Verify=verify))
    sizes = rc.WireSizes(slm, llm)
    assert sizes.available
    import asyncio

    request = verifier_pb2.VerifyRequest(session_id="s", draft_token_ids=[1, 2, 3])
    reply = asyncio.run(slm._stub.Draft(drafter_pb2.DraftRequest(session_id="s"), timeout=1))
    asyncio.run(llm._verifier.Verify(request))
    assert reply.position == 7 and calls == [{"timeout": 1}]
    assert sizes.medians() == {"draft_reply_bytes": reply.ByteSize(),
                               "verify_request_bytes": request.ByteSize()}
    sizes.clear()
    assert sizes.medians() == {"draft_reply_bytes": None, "verify_request_bytes": None}
    assert not rc.WireSizes(SimpleNamespace(), llm).available


def test_the_family_text_tokenizes_to_a_head_and_a_body(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel({"<bos>": 0, "a": 1, "b": 2, "[UNK]": 3},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                             special_tokens=[("<bos>", 0)])
    (tmp_path / "slm").mkdir()
    tokenizer.save(str(tmp_path / "slm" / "tokenizer.json"))
    zoo = SimpleNamespace(model=lambda tier: tmp_path / tier,
                          heldout_prompts=lambda: [{"prompt": "a b ", "reference": "b a"}])
    head, body = rc.family_tokens(zoo)
    assert head == [0] and body[-4:] == [1, 2, 2, 1]
    assert rc.context_ids(head, body, 20)[0] == 0
