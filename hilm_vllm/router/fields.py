"""Every request field of vLLM 0.32's `/v1/completions` and `/v1/chat/completions`, and what
the router does with it: applied in every policy, refused with a 400 when set to anything but
its neutral value (it would change the output and no policy applies it yet), or ignored (it
cannot change the output). A field vLLM does not know is ignored, as vLLM does, and listed in
`usage.hilm.ignored_fields`.

`tests/router/test_fields.py` checks this table against vLLM's own request models, so a vLLM
upgrade that adds a field fails until the field is classified here, and checks that
docs/api-fields.md is `markdown()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hilm_vllm import codec
from hilm_vllm.errors import InvalidArgument

APPLIED, LLM_ONLY, REFUSED, IGNORED = "applied", "llm-only", "refused", "ignored"
NO_POLICY = "no policy applies it yet"


@dataclass(frozen=True)
class Field:
    status: str  # APPLIED, LLM_ONLY, REFUSED or IGNORED
    note: str = ""
    neutral: tuple = (None,)  # REFUSED, LLM_ONLY: the values that change nothing (ignored)


def _refused(note: str, *neutral) -> Field:
    return Field(REFUSED, note, (None, *neutral))


def _transform(*neutral) -> Field:
    return Field(APPLIED, "a sampler transform: the LLM's own sampler under llm-only; the "
                 "drafter's q and every verifier's p under the others, each draft row counting "
                 "the draft tokens before it, as vLLM's speculative decoding does",
                 (None, *neutral))


_FORMAT = "asks for data the router does not return"
_STRUCTURED = ("structured output, with vLLM's xgrammar backend: the LLM's own under llm-only; "
               "under the others the drafter drafts inside the grammar and every verifier masks "
               "its p with it (each draft row after the draft tokens before it), so lossless "
               "policies sample the LLM's constrained law; every tier needs the same "
               "--structured-outputs-config")
STRUCTURED = ("response_format", "structured_outputs")  # read from the body's other fields
_LOGPROBS = ("each token's raw logprob (as vLLM reports them) under the distribution that "
             "decided it: the LLM's (every token of the lossless policies), the ILM's or the "
             "drafter's for tokens they kept; the deciding tier in `hilm_tier(s)`")

FIELDS: dict[str, Field] = {
    # -- applied in every policy ---------------------------------------------------------------
    "model": Field(APPLIED, "the served model name (the router's --policy) or a policy name"),
    "prompt": Field(APPLIED, "text or token ids (completions)"),
    "messages": Field(APPLIED, "text content; the model's chat template (chat)"),
    "add_generation_prompt": Field(APPLIED, "chat"),
    "max_tokens": Field(APPLIED),
    "max_completion_tokens": Field(APPLIED, "chat"),
    "temperature": Field(APPLIED),
    "top_p": Field(APPLIED),
    "top_k": Field(APPLIED),
    "seed": Field(APPLIED, "each tier draws from its own stream derived from it"),
    "n": Field(APPLIED, "up to --max-n choices, each its own seed stream"),
    "stream": Field(APPLIED),
    "stream_options": Field(APPLIED, "include_usage, continuous_usage_stats"),
    "stop": Field(APPLIED, "after min_tokens, as vLLM's detokenizer"),
    "stop_token_ids": Field(APPLIED),
    "min_tokens": Field(APPLIED, "EOS and stop ids masked in q and in every p"),
    "include_stop_str_in_output": Field(APPLIED),
    "ignore_eos": Field(APPLIED),
    # -- refused unless neutral: they change the output ------------------------------------------
    "frequency_penalty": _transform(0, 0.0),
    "presence_penalty": _transform(0, 0.0),
    "repetition_penalty": _transform(1, 1.0),
    "logit_bias": _transform({}),
    "min_p": _transform(0, 0.0),
    "allowed_token_ids": _transform(),
    "logprobs": Field(APPLIED, _LOGPROBS),
    "echo": Field(APPLIED, "completions: the prompt's text before the completion's; with "
                  "logprobs, the prompt's tokens with the LLM's logprobs of them (vLLM's "
                  "prompt logprobs, one more LLM call, any policy; `prompt` in hilm_tiers); "
                  "chat: a 400", (None, False)),
    "top_logprobs": Field(APPLIED, _LOGPROBS + " (chat, with logprobs: true)"),
    "bad_words": Field(APPLIED, "a sampler transform: the LLM's own sampler under llm-only; "
                       "under the others the router tokenizes the words as vLLM does and the "
                       "drafter's q and every verifier's p ban a word's last token where the "
                       "output before the row ends with the rest of it",
                       (None, [])),
    # -- refused: no policy applies them ---------------------------------------------------------
    "response_format": Field(APPLIED, _STRUCTURED + " (json_object, json_schema)",
                             (None, {"type": "text"})),
    "structured_outputs": Field(APPLIED, _STRUCTURED + " (json, regex, choice, grammar, "
                                "json_object)", (None,)),
    "prompt_logprobs": _refused(_FORMAT + " (prompt logprobs)"),
    "logprob_token_ids": _refused(_FORMAT + " (per-token logprobs)"),
    "use_beam_search": _refused("beam search is not speculative sampling", False),
    "length_penalty": _refused("beam search only", 1, 1.0),
    "suffix": _refused("insertion (fill-in-the-middle) prompts"),
    "prompt_embeds": _refused("the drafter and the verifiers take token ids"),
    "tools": _refused("tool calling (the chat template and a parser)", []),
    "tool_choice": _refused("tool calling", "none", "auto"),
    "parallel_tool_calls": _refused("tool calling", True),
    "chat_template": _refused("the model's own template is used"),
    "chat_template_kwargs": _refused("the model's own template is used", {}),
    "continue_final_message": _refused("the model's own template is used", False),
    "documents": _refused("the model's own template is used", []),
    "reasoning_effort": _refused("a chat template argument"),
    "include_reasoning": _refused("no reasoning parser on the router", True),
    "thinking_token_budget": _refused("no reasoning parser on the router"),
    "add_special_tokens": _refused("prompts are tokenized as vLLM's defaults do", True, False),
    "skip_special_tokens": _refused("text skips special tokens, vLLM's default", True),
    "spaces_between_special_tokens": _refused("vLLM's default detokenization", True),
    "truncate_prompt_tokens": _refused("prompts are never truncated (--max-prompt-tokens)"),
    "truncation_side": _refused("prompts are never truncated"),
    "return_token_ids": _refused(_FORMAT + " (token ids)", False),
    "return_tokens_as_token_ids": _refused(_FORMAT + " (token ids as text)", False),
    "return_token_offsets": _refused(_FORMAT + " (offsets)", False),
    "return_prompt_text": _refused(_FORMAT + " (the prompt text)", False),
    "mm_processor_kwargs": _refused("text-only models", {}),
    "media_io_kwargs": _refused("text-only models", {}),
    "mm_payload": _refused("text-only models", "tensors"),
    "return_mm_kwargs": _refused("text-only models", False),
    "watermarking": _refused("a sampling transform"),
    "repetition_detection": _refused("stops generation on repeats"),
    "vllm_xargs": _refused("arguments for the engine's own plugins", {}),
    "kv_transfer_params": _refused("disaggregated prefill is not the router's"),
    "ec_transfer_params": _refused("disaggregated encoding is not the router's"),
    "routed_experts_prompt_start": _refused("MoE routing data", 0),
    # -- ignored: they cannot change the output ----------------------------------------------------
    "user": Field(IGNORED, "an end-user id"),
    "request_id": Field(IGNORED, "the router names its own requests"),
    "priority": Field(IGNORED, "the router's fair queue orders requests"),
    "cache_salt": Field(IGNORED, "prefix-cache isolation; sessions are per request"),
    "session_id": Field(IGNORED, "the router's tier sessions are per request"),
    "stream_interval": Field(IGNORED, "chunking of the stream only"),
}

# hilm-vllm's own request fields (all applied; not vLLM's)
HILM_FIELDS = ("policy", "skip_rate", "block_size", "thresholds", "optimistic")


def transform_values(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The sampler transforms (the penalties, logit bias, min_p, allowed and bad tokens) that
    `extra` sets to a value that changes the output."""
    return {name: value for name, value in extra.items()
            if name in codec.PENALTY_FIELDS and not is_neutral(value, FIELDS[name].neutral)}


def check(extra: Mapping[str, Any]) -> None:
    """Refuse a request that sets, to anything but a neutral value, a field that would change
    its output and that no policy applies (400, naming the field)."""
    for name, value in extra.items():
        f = FIELDS.get(name)
        if f is not None and f.status == REFUSED and not is_neutral(value, f.neutral):
            raise InvalidArgument(
                f"`{name}` is not supported by the router ({f.note}; {NO_POLICY}): leave it "
                f"unset" + (f" or {_neutral_text(f)}" if len(f.neutral) > 1 else "")
                + " (docs/api-fields.md lists every field)")


def is_neutral(value: Any, neutral: tuple) -> bool:
    """`value` is one of `neutral` (JSON values: 0 and 0.0 are one number; a bool is not)."""
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral)


def _neutral_text(f: Field) -> str:
    shown = []
    for v in f.neutral[1:]:
        if not any(v == w and type(v) is type(w) for w in shown) and not (
                isinstance(v, float) and any(v == w for w in shown)):
            shown.append(v)
    return " / ".join(repr(v) for v in shown)


def markdown() -> str:
    """docs/api-fields.md."""
    out = ["# Request fields (`/v1/completions`, `/v1/chat/completions`)", "",
           "Every field of vLLM 0.32's request models and what the router does with it "
           "(`hilm_vllm/router/fields.py`; `tests/router/test_fields.py` checks this page and "
           "the table against vLLM). **applied**: in every policy. **llm-only**: applied by the "
           "LLM's own vLLM sampler under the `llm-only` policy, a 400 under the others (no "
           "field today). **refused**: a 400 naming "
           "the field when it is set to anything but a value that changes nothing (those are "
           "accepted and listed in `usage.hilm.ignored_fields`). **ignored**: it cannot change "
           "the output; accepted and listed in `usage.hilm.ignored_fields`. A field vLLM does "
           "not know is ignored the same way, as vLLM does. The router's own fields: "
           + ", ".join(f"`{n}`" for n in HILM_FIELDS) + ".", "",
           "| field | status | values that change nothing | note |", "| --- | --- | --- | --- |"]
    for status in (APPLIED, LLM_ONLY, REFUSED, IGNORED):
        for name, f in sorted(FIELDS.items()):
            if f.status == status:
                ok = ("unset" + (", " + _neutral_text(f) if len(f.neutral) > 1 else "")
                      if status in (REFUSED, LLM_ONLY) or len(f.neutral) > 1 else "")
                out.append(f"| `{name}` | {status} | {ok} | {f.note} |")
    return "\n".join(out) + "\n"
