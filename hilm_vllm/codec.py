"""Protobuf, plain dicts and YAML <-> domain objects, in one place.

Every service, client and file format of the project converts through here:

| domain | protobuf | plain (msgpack / JSON / YAML) |
| --- | --- | --- |
| `SamplingSpec` | `sampling_to_pb` / `sampling_from_pb` | `sampling_to_dict` / `sampling_from_dict`; vLLM's `SamplingParams`: `sampling_from_vllm` |
| `UncertaintyConfig` | `uncertainty_to_pb` / `uncertainty_from_pb` | `uncertainty_to_dict` / `uncertainty_from_dict` |
| a prompt (ids or text) | `prompt_to_pb` / `prompt_from_pb` | |
| `ScoredToken` (token, u, sparse dist) | `dist_to_pb`, `dist_from_pb`, `scored_from_pb` | |
| `ThresholdsFile` (`hilm calibrate`'s YAML) | | `read_thresholds` / `write_thresholds` |

and the checks every tier makes the same way: `check_token_ids` (the one token-range check) and
`eos_token_ids` (the one EOS lookup). Proto3 defaults mean "unset": top_p 0 is 1 (off), an unset
seed is no seed, a 0 in an uncertainty field is the tier's default. A value that cannot be used
raises `InvalidArgument` saying what to send instead.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from hilm_vllm.errors import InvalidArgument
from hilm_vllm.proto.hilm.v1 import common_pb2
from hilm_vllm.sampling import (ID_DTYPE, LOGIT_BIAS_LIMIT, MAX_LOGPROBS, WEIGHT_DTYPE,
                                Penalties, SamplingSpec, ScoredToken, Structured, TokenLogprob,
                                unpack_row)
from hilm_vllm.server.caps import check_client_samples
from hilm_vllm.thresholds import Thresholds
from hilm_vllm.uncertainty import MAX_SAMPLES, Gate, Perturbation, UncertaintyConfig

Prompt = list[int] | str

# ---- sampling ---------------------------------------------------------------------------------


def sampling(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None) -> SamplingSpec:
    """A SamplingSpec from client values in vLLM's conventions (top_k 0 or -1 = off), with
    InvalidArgument naming the bad field."""
    try:
        return SamplingSpec(float(temperature), int(top_k), float(top_p), seed)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(str(e)) from None


def sampling_to_pb(spec: SamplingSpec) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(temperature=spec.temperature, top_k=spec.top_k,
                                   top_p=spec.top_p)
    if spec.seed is not None:
        pb.seed = spec.seed
    if spec.penalties is not None:
        pb.penalties.CopyFrom(penalties_to_pb(_penalty_kwargs(spec.penalties)))
        pb.penalties.output_start = spec.penalties.output_start
        for word in spec.penalties.bad_words:
            pb.penalties.bad_words_token_ids.add(ids=word)
    if spec.structured is not None:
        pb.structured.params = spec.structured.params
        pb.structured.output_start = spec.structured.output_start
    return pb


def sampling_from_pb(pb: common_pb2.SamplingParams, vocab_size: int | None = None
                     ) -> SamplingSpec:
    """top_p 0 (unset) is 1 (off); a negative one is an error, as over HTTP. `penalties` are
    checked (token ids against `vocab_size` when given); bad words travel as token ids."""
    spec = sampling(pb.temperature, pb.top_k, pb.top_p if pb.top_p != 0 else 1.0,
                    pb.seed if pb.HasField("seed") else None)
    if pb.HasField("structured"):
        spec = dataclasses.replace(spec, structured=structured_spec(
            structured_from_json(pb.structured.params, "sampling.structured.params"),
            pb.structured.output_start))
    if not pb.HasField("penalties"):
        return spec
    if pb.penalties.bad_words:
        raise InvalidArgument("sampling.penalties.bad_words: a session's tier takes bad words "
                              "as token ids (bad_words_token_ids), tokenized as vLLM does")
    d = penalties_from_pb(pb.penalties, vocab_size, in_session=True)
    words = [list(w.ids) for w in pb.penalties.bad_words_token_ids]
    check_bad_word_ids(words, vocab_size)
    return _with_penalties(spec, d | {"bad_words_ids": words}, pb.penalties.output_start)


def generate_sampling_from_pb(pb: common_pb2.SamplingParams) -> SamplingSpec:
    """GenerateRequest.sampling: the transforms travel as GenerateRequest.penalties there."""
    if pb.HasField("penalties"):
        raise InvalidArgument("GenerateRequest.sampling.penalties: send the sampler transforms "
                              "as GenerateRequest.penalties")
    if pb.HasField("structured"):
        raise InvalidArgument("GenerateRequest.sampling.structured: send the constraint as "
                              "GenerateRequest.structured_outputs")
    return sampling_from_pb(pb)


def sampling_to_dict(spec: SamplingSpec) -> dict:
    d = {"temperature": spec.temperature, "top_k": spec.top_k, "top_p": spec.top_p,
         "seed": spec.seed}
    if spec.penalties is not None:
        d["penalties"] = _penalty_kwargs(spec.penalties) | {
            "logit_bias": [list(b) for b in spec.penalties.logit_bias],
            "output_start": spec.penalties.output_start,
            "bad_words_ids": [list(w) for w in spec.penalties.bad_words]}
    if spec.structured is not None:
        d["structured"] = [spec.structured.params, spec.structured.output_start,
                           list(spec.structured.stop_token_ids)]
    return d


def sampling_from_dict(d: Mapping) -> SamplingSpec:
    spec = SamplingSpec(d["temperature"], d["top_k"], d["top_p"], d.get("seed"),
                        structured=(Structured(*d["structured"][:2], tuple(d["structured"][2]))
                                    if d.get("structured") else None))
    if (p := d.get("penalties")) is None:
        return spec
    return _with_penalties(spec, dict(p) | {"logit_bias": {int(t): b for t, b in
                                                           p.get("logit_bias", ())}},
                           int(p.get("output_start", 0)))


def _penalty_kwargs(p: Penalties) -> dict:
    """Penalties -> vLLM SamplingParams keyword arguments (output_start aside)."""
    return {"presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
            "repetition_penalty": p.repetition_penalty, "min_p": p.min_p,
            "logit_bias": dict(p.logit_bias), "allowed_token_ids": list(p.allowed_token_ids)}


def _with_penalties(spec: SamplingSpec, d: Mapping, output_start: int) -> SamplingSpec:
    try:
        pen = Penalties(float(d.get("presence_penalty", 0.0)),
                        float(d.get("frequency_penalty", 0.0)),
                        float(d.get("repetition_penalty", 1.0)), float(d.get("min_p", 0.0)),
                        tuple(dict(d.get("logit_bias") or {}).items()),
                        tuple(d.get("allowed_token_ids") or ()), output_start,
                        tuple(tuple(w) for w in d.get("bad_words_ids") or ()))
        return SamplingSpec(spec.temperature, spec.top_k, spec.top_p, spec.seed, pen,
                            spec.structured)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"sampling.penalties: {e}") from None


def sampling_from_vllm(params) -> SamplingSpec:
    """The transform vLLM's sampler applies for these `vllm.SamplingParams` (its seed aside)."""
    return SamplingSpec(params.temperature, params.top_k, params.top_p)


# ---- structured outputs -----------------------------------------------------------------------

# vLLM's StructuredOutputsParams fields this project passes on (one constraint at a time).
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# Fields vLLM 0.32's backends read from the engine's --structured-outputs-config, not from the
# request (a request's value would be ignored): refused, with where to set them.
STRUCTURED_ENGINE_OPTIONS = ("disable_any_whitespace", "disable_additional_properties",
                             "whitespace_pattern")
MAX_STRUCTURED_BYTES = 64 << 10


def structured_outputs(response_format: object = None, structured: object = None
                       ) -> dict | None:
    """The OpenAI `response_format` and vLLM's `structured_outputs` request fields (JSON values)
    -> StructuredOutputsParams keyword arguments (as vLLM's server combines them: the format
    overrides), or None when neither constrains the output; InvalidArgument saying what to fix."""
    out: dict = {}
    if structured is not None:
        if not isinstance(structured, Mapping):
            raise InvalidArgument("structured_outputs must be an object (vLLM's "
                                  "StructuredOutputsParams: json, regex, choice, grammar, ...)")
        engine = sorted(k for k in structured if k in STRUCTURED_ENGINE_OPTIONS
                        and structured[k] not in (None, False, ""))
        if engine:
            raise InvalidArgument(
                f"structured_outputs.{engine[0]}: vLLM's backends take it from the LLM "
                f"engine's --structured-outputs-config (e.g. --llm-args "
                f"'--structured-outputs-config {{\"backend\": \"xgrammar\", "
                f"\"{engine[0]}\": true}}'), not from a request: leave it unset")
        unknown = (set(structured) - set(STRUCTURED_KINDS) - set(STRUCTURED_ENGINE_OPTIONS))
        if unknown:
            raise InvalidArgument(f"structured_outputs.{sorted(unknown)[0]}: not supported "
                                  f"(use one of {', '.join(STRUCTURED_KINDS)})")
        out = {k: v for k, v in structured.items()
               if k in STRUCTURED_KINDS and v is not None and v is not False}
    if response_format is not None:
        if not isinstance(response_format, Mapping) or "type" not in response_format:
            raise InvalidArgument("response_format must be an object with a type: text, "
                                  "json_object or json_schema")
        kind = response_format["type"]
        if kind == "json_object":
            out = {k: v for k, v in out.items() if k not in STRUCTURED_KINDS}
            out["json_object"] = True
        elif kind == "json_schema":
            js = response_format.get("json_schema")
            schema = js.get("schema", js.get("json_schema")) if isinstance(js, Mapping) else None
            if not isinstance(schema, Mapping):
                raise InvalidArgument("response_format json_schema needs json_schema.schema "
                                      "(an object)")
            out = {k: v for k, v in out.items() if k not in STRUCTURED_KINDS}
            out["json"] = dict(schema)
        elif kind != "text":
            raise InvalidArgument(f"response_format.type {kind!r}: use text, json_object or "
                                  f"json_schema")
    kinds = [k for k in STRUCTURED_KINDS if k in out]
    if not kinds:
        return None
    if len(kinds) > 1:
        raise InvalidArgument(f"structured output: one constraint at a time, got "
                              f"{', '.join(kinds)}")
    if len(json.dumps(out)) > MAX_STRUCTURED_BYTES:
        raise InvalidArgument(f"structured output larger than {MAX_STRUCTURED_BYTES} bytes")
    return out


def structured_spec(params: Mapping | None, output_start: int) -> Structured | None:
    """StructuredOutputsParams keyword arguments (checked by `structured_outputs`) -> the
    constraint a session's tiers apply to their rows (compact JSON, keys in their order: a
    JSON schema's property order is the order its grammar generates them in), or None."""
    if not params:
        return None
    return Structured(json.dumps(dict(params), separators=(",", ":")), int(output_start))


def structured_from_json(text: str, what: str = "structured_outputs") -> dict | None:
    """GenerateRequest.structured_outputs -> StructuredOutputsParams keyword arguments."""
    if not text:
        return None
    if len(text) > MAX_STRUCTURED_BYTES:
        raise InvalidArgument(f"{what} larger than {MAX_STRUCTURED_BYTES} bytes")
    try:
        value = json.loads(text)
    except ValueError:
        raise InvalidArgument(f"{what} is not JSON") from None
    return structured_outputs(None, value)


# ---- logprobs ---------------------------------------------------------------------------------


def check_logprobs(n: int | None, field: str = "logprobs") -> int | None:
    """A request's number of top logprobs (None = none wanted), bounded as vLLM bounds it."""
    if n is None:
        return None
    if isinstance(n, bool) or not 0 <= int(n) <= MAX_LOGPROBS:
        raise InvalidArgument(f"{field} must be in [0, {MAX_LOGPROBS}], got {n!r}")
    return int(n)


def logprob_to_pb(t: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(logprob=t.logprob, top_token_ids=t.top_ids,
                                   top_logprobs=t.top_logprobs)


def logprob_from_pb(pb: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(pb.logprob, tuple(pb.top_token_ids), tuple(pb.top_logprobs))


def logprob_to_dict(t: TokenLogprob) -> list:
    return [t.logprob, list(t.top_ids), list(t.top_logprobs)]


def logprob_from_dict(d: Sequence) -> TokenLogprob:
    return TokenLogprob(float(d[0]), tuple(int(i) for i in d[1]),
                        tuple(float(v) for v in d[2]))


# ---- uncertainty ------------------------------------------------------------------------------

GATES = {Gate.PERTURBED: common_pb2.PERTURBED_TEMPERATURE, Gate.ENTROPY: common_pb2.ENTROPY,
         Gate.VAR_ENTROPY: common_pb2.VAR_ENTROPY, Gate.MAX_PROB: common_pb2.MAX_PROB}
PERTURBATIONS = {Perturbation.UNIFORM: common_pb2.UNIFORM, Perturbation.GRID: common_pb2.GRID}
_GATES_BACK = {v: k for k, v in GATES.items()}
_PERTURBATIONS_BACK = {v: k for k, v in PERTURBATIONS.items()}


def uncertainty_to_pb(cfg: UncertaintyConfig) -> common_pb2.UncertaintyConfig:
    return common_pb2.UncertaintyConfig(gate=GATES[cfg.gate], num_samples=cfg.num_samples,
                                        theta_max=cfg.theta_max,
                                        perturbation=PERTURBATIONS[cfg.perturbation])


def uncertainty_from_pb(pb: common_pb2.UncertaintyConfig, default: UncertaintyConfig,
                        max_samples: int = MAX_SAMPLES) -> UncertaintyConfig:
    """Unset (0) fields take the tier's defaults (its --uncertainty-* flags); K over
    `max_samples` (the tier's --max-uncertainty-samples) is INVALID_ARGUMENT naming it."""
    if pb.gate and pb.gate not in _GATES_BACK:
        raise InvalidArgument(f"uncertainty.gate {pb.gate} is unknown: send one of "
                              f"hilm.v1.UncertaintyGate's values, or 0 for this tier's default "
                              f"({default.gate.value})")
    if pb.perturbation and pb.perturbation not in _PERTURBATIONS_BACK:
        raise InvalidArgument(f"uncertainty.perturbation {pb.perturbation} is unknown: send one "
                              f"of hilm.v1.Perturbation's values, or 0 for this tier's default "
                              f"({default.perturbation.value})")
    if pb.num_samples and not 1 <= pb.num_samples <= MAX_SAMPLES:
        raise InvalidArgument(f"uncertainty.num_samples (K) must be in [1, {MAX_SAMPLES}], got "
                              f"{pb.num_samples}: send 0 for this tier's default "
                              f"({default.num_samples})")
    check_client_samples(pb.num_samples, max_samples)  # the tier's --max-uncertainty-samples
    if pb.theta_max and not 0 < pb.theta_max <= 100:  # also NaN
        raise InvalidArgument(f"uncertainty.theta_max must be in (0, 100], got {pb.theta_max}: "
                              f"send 0 for this tier's default ({default.theta_max})")
    return UncertaintyConfig(
        gate=_GATES_BACK[pb.gate] if pb.gate else default.gate,
        num_samples=pb.num_samples or default.num_samples,
        theta_max=pb.theta_max or default.theta_max,
        perturbation=(_PERTURBATIONS_BACK[pb.perturbation] if pb.perturbation
                      else default.perturbation))


def uncertainty_to_dict(cfg: UncertaintyConfig) -> dict:
    return {"gate": cfg.gate.value, "num_samples": cfg.num_samples, "theta_max": cfg.theta_max,
            "perturbation": cfg.perturbation.value}


def uncertainty_from_dict(d: Mapping | None) -> UncertaintyConfig:
    """Missing keys take the defaults; ValueError says which value is bad."""
    d = d or {}
    default = UncertaintyConfig()
    try:
        return UncertaintyConfig(d.get("gate", default.gate), int(d.get("num_samples",
                                                                        default.num_samples)),
                                 float(d.get("theta_max", default.theta_max)),
                                 d.get("perturbation", default.perturbation))
    except (AttributeError, TypeError) as e:
        raise ValueError(f"bad uncertainty block {dict(d)!r}: {e}") from None


# ---- prompts, token ids, EOS ------------------------------------------------------------------


def prompt_to_pb(prompt: Sequence[int] | str) -> common_pb2.Prompt:
    if isinstance(prompt, str):
        return common_pb2.Prompt(text=prompt)
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(prompt)))


def prompt_from_pb(pb: common_pb2.Prompt) -> Prompt:
    kind = pb.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("prompt is missing: set prompt.token_ids or prompt.text")
    return list(pb.token_ids.ids) if kind == "token_ids" else pb.text


# Most stop token ids one request or session may name (the router's front doors and the drafter
# check it).
MAX_STOP_TOKEN_IDS = 1024


def check_stop_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    """stop_token_ids: at most MAX_STOP_TOKEN_IDS, each in the vocabulary."""
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(f"stop_token_ids has {len(ids)} ids; at most "
                              f"{MAX_STOP_TOKEN_IDS} are allowed")
    check_token_ids(ids, vocab_size, "stop_token_ids")


# vLLM's sampler transforms the generating model applies itself (GenerateRequest.penalties):
# the `llm-only` policy on the LLM tier. Each list or map holds at most MAX_PENALTY_ITEMS.
PENALTY_FIELDS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p",
                  "logit_bias", "allowed_token_ids", "bad_words")
MAX_PENALTY_ITEMS = 1024
MAX_BAD_WORD_CHARS = 256


def penalties(values: Mapping[str, object]) -> dict:
    """Request fields (JSON values) -> vLLM `SamplingParams` keyword arguments, checked:
    numbers for the penalties and min_p, {token id: bias}, token ids, strings; InvalidArgument
    naming what is wrong. Fields not in PENALTY_FIELDS are not taken."""
    out: dict = {}
    for name in PENALTY_FIELDS:
        if name not in values or values[name] is None:
            continue
        v = values[name]
        try:
            if name == "logit_bias":  # clamped as vLLM's SamplingParams.from_optional does
                out[name] = {int(k): min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, float(b)))
                             for k, b in dict(v).items()}
            elif name == "allowed_token_ids":
                out[name] = [int(t) for t in v]
            elif name == "bad_words":
                if isinstance(v, str) or not all(isinstance(w, str) for w in v):
                    raise TypeError
                out[name] = list(v)
            else:
                if isinstance(v, bool):
                    raise TypeError
                out[name] = float(v)
        except (TypeError, ValueError):
            raise InvalidArgument(f"{name}: expected {_PENALTY_TYPES[name]}, got {v!r}") from None
        if not isinstance(out[name], float) and len(out[name]) > MAX_PENALTY_ITEMS:
            raise InvalidArgument(f"{name} has {len(out[name])} entries; at most "
                                  f"{MAX_PENALTY_ITEMS}")
    if any(len(w) > MAX_BAD_WORD_CHARS for w in out.get("bad_words", ())):
        raise InvalidArgument(f"a bad_words entry is longer than {MAX_BAD_WORD_CHARS} characters")
    return out


_PENALTY_TYPES = {"logit_bias": "an object of token id -> bias",
                  "allowed_token_ids": "a list of token ids", "bad_words": "a list of strings",
                  **{n: "a number" for n in ("presence_penalty", "frequency_penalty",
                                             "repetition_penalty", "min_p")}}


def penalties_to_pb(p: Mapping) -> common_pb2.Penalties:
    out = common_pb2.Penalties(allowed_token_ids=p.get("allowed_token_ids", ()),
                               bad_words=p.get("bad_words", ()))
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        if name in p:
            setattr(out, name, p[name])
    for k, b in p.get("logit_bias", {}).items():
        out.logit_bias[k] = b
    return out


def penalties_from_pb(pb: common_pb2.Penalties, vocab_size: int | None,
                      in_session: bool = False) -> dict:
    """Penalties -> vLLM keyword arguments; token ids checked (against `vocab_size` when
    given), logit biases clamped as over HTTP."""
    out: dict = {n: getattr(pb, n) for n in ("presence_penalty", "frequency_penalty",
                                             "repetition_penalty", "min_p") if pb.HasField(n)}
    if pb.logit_bias:
        if vocab_size is not None:
            check_token_ids(list(pb.logit_bias), vocab_size, "logit_bias")
        out["logit_bias"] = {t: min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, b))
                             for t, b in pb.logit_bias.items()}
    if pb.allowed_token_ids:
        if vocab_size is not None:
            check_token_ids(pb.allowed_token_ids, vocab_size, "allowed_token_ids")
        out["allowed_token_ids"] = list(pb.allowed_token_ids)
    if pb.bad_words:
        out["bad_words"] = list(pb.bad_words)
    if pb.bad_words_token_ids and not in_session:
        raise InvalidArgument("penalties.bad_words_token_ids: a session's field (SamplingParams);"
                              " here send the bad_words strings")
    for name in ("logit_bias", "allowed_token_ids", "bad_words"):
        if len(out.get(name, ())) > MAX_PENALTY_ITEMS:
            raise InvalidArgument(f"{name} has {len(out[name])} entries; at most "
                                  f"{MAX_PENALTY_ITEMS}")
    return out


MAX_BAD_WORDS = 128  # vLLM's VLLM_MAX_NUM_BAD_WORDS default: sequences after tokenization
MAX_BAD_WORDS_TOKENS = 1024  # vLLM's VLLM_MAX_BAD_WORDS_TOTAL_TOKENS default


def check_bad_word_ids(words: Sequence[Sequence[int]], vocab_size: int | None) -> None:
    """Bad words as token-id sequences: bounded as vLLM bounds them, ids in the vocabulary."""
    if len(words) > MAX_BAD_WORDS:
        raise InvalidArgument(f"{len(words)} bad words after tokenization; at most "
                              f"{MAX_BAD_WORDS}")
    if sum(len(w) for w in words) > MAX_BAD_WORDS_TOKENS:
        raise InvalidArgument(f"bad words hold more than {MAX_BAD_WORDS_TOKENS} tokens in all")
    if any(not w for w in words):
        raise InvalidArgument("a bad word is an empty token sequence")
    if vocab_size is not None:
        check_token_ids([t for w in words for t in w], vocab_size, "bad_words_token_ids")


def bad_words_token_ids(words: Sequence[str], tokenizer) -> tuple[tuple[int, ...], ...]:
    """vLLM's tokenization of bad words (`SamplingParams.update_from_tokenizer`: each word as
    is and with a leading space, where that makes a new first token), checked and bounded as
    vLLM checks them; InvalidArgument with vLLM's message."""
    if not words:
        return ()
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError

    # a transformers tokenizer seen as vLLM's tokenizer wrapper sees it (max_token_id)
    seen = SimpleNamespace(encode=tokenizer.encode, max_token_id=getattr(
        tokenizer, "max_token_id", None) or len(tokenizer) - 1)
    try:
        params = SamplingParams(bad_words=list(words))
        params.update_from_tokenizer(seen)
    except (ValueError, VLLMClientError) as e:  # vLLM's message, without the words echoed
        raise InvalidArgument(f"bad_words: {e.args[0] if e.args else e}") from None
    out = tuple(tuple(int(t) for t in w) for w in params.bad_words_token_ids or ())
    check_bad_word_ids(out, len(tokenizer))
    return out


def check_token_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    """InvalidArgument naming the first id of `ids` outside [0, vocab_size)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidArgument(f"{what} has token id {bad} outside the vocabulary "
                              f"[0, {vocab_size}): send ids the model's tokenizer produced")


def eos_token_ids(model_config, tokenizer=None) -> tuple[int, ...]:
    """Every id the model stops on, as vLLM's generation does (`SamplingParams.
    update_from_generation_config`): the tokenizer's EOS first, then the model's
    `generation_config.eos_token_id` list; without a tokenizer (--skip-tokenizer-init) the
    model config's. Empty when the model names none."""
    ids: list[int] = []

    def add(value) -> None:
        for v in value if isinstance(value, (list, tuple, set)) else (value,):
            if isinstance(v, int) and v >= 0 and v not in ids:
                ids.append(v)

    add(getattr(tokenizer, "eos_token_id", None))
    try:
        add((model_config.try_get_generation_config() or {}).get("eos_token_id"))
    except Exception:  # no generation_config.json
        pass
    if tokenizer is None or getattr(tokenizer, "eos_token_id", None) is None:
        add(getattr(model_config.hf_text_config, "eos_token_id", None))
    return tuple(ids)


# ---- tokens with their distribution -----------------------------------------------------------


def dist_to_pb(ids: np.ndarray, probs: np.ndarray) -> common_pb2.SparseDistribution:
    """Packed (6 bytes an entry, no per-entry objects) when the weights are float16 values, as
    the tiers' rows are; otherwise the repeated fields, so no row is ever rounded on the way."""
    probs = np.asarray(probs, np.float32)
    half = probs.astype(WEIGHT_DTYPE)
    if np.array_equal(half.astype(np.float32), probs):
        return common_pb2.SparseDistribution(
            packed_token_ids=np.ascontiguousarray(ids, ID_DTYPE).tobytes(),
            packed_weights=half.tobytes())
    return common_pb2.SparseDistribution(token_ids=np.asarray(ids).tolist(),
                                         probs=probs.tolist())


def dist_from_pb(pb: common_pb2.SparseDistribution) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [S], weights float32 [S]) from either encoding; InvalidArgument when the
    packed fields do not pair up."""
    if pb.packed_token_ids or pb.packed_weights:
        if pb.token_ids or pb.probs:
            raise InvalidArgument("a distribution has both packed and repeated entries: send "
                                  "one encoding")
        n_ids, n_w = len(pb.packed_token_ids), len(pb.packed_weights)
        if n_ids % 4 or n_w % 2 or n_ids // 4 != n_w // 2:
            raise InvalidArgument(f"packed distribution: {n_ids} bytes of int32 ids and {n_w} "
                                  f"bytes of float16 weights do not pair up (4 and 2 bytes an "
                                  f"entry)")
        return unpack_row(pb.packed_token_ids, pb.packed_weights)
    return np.asarray(pb.token_ids, np.int32), np.asarray(pb.probs, np.float32)


def scored_from_pb(pb) -> ScoredToken:
    """A `hilm.v1.DraftedToken` or `hilm.v1.EmittedToken` -> ScoredToken."""
    return ScoredToken(pb.token_id, pb.uncertainty, *dist_from_pb(pb.dist))


# ---- thresholds -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdsFile:
    """What `hilm calibrate` writes and the router reads: the thresholds, the gate the drafter's
    u is measured with (`uncertainty`, sent to the drafter), the ILM's (`ilm_uncertainty`: t_ilm
    compares the ILM's own u), and everything else the file reports (kept as read)."""

    thresholds: Thresholds
    uncertainty: UncertaintyConfig | None = None
    ilm_uncertainty: UncertaintyConfig | None = None
    family: str | None = None
    rule: str | None = None
    report: dict = field(default_factory=dict)  # gate_choice, auc, operating_points, fits...

    def to_doc(self) -> dict:
        th = self.thresholds
        doc: dict = {"family": self.family, "rule": self.rule}
        doc |= {k: v for k, v in self.report.items() if k in ("risk_budget", "target_tr")}
        doc |= {"t1": round(th.t1, 6), "t2": round(th.t2, 6), "t_ilm": round(th.t_ilm, 6)}
        for key, cfg in (("uncertainty", self.uncertainty),
                         ("ilm_uncertainty", self.ilm_uncertainty)):
            if cfg is not None:
                doc[key] = uncertainty_to_dict(cfg)
        return doc | {k: v for k, v in self.report.items() if k not in doc}

    @classmethod
    def from_doc(cls, doc: Mapping, source: str = "thresholds") -> ThresholdsFile:
        try:
            th = Thresholds(float(doc["t1"]), float(doc["t2"]), float(doc["t_ilm"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{source}: expected numbers t1, t2, t_ilm (as `hilm calibrate` "
                             f"writes)") from None
        blocks = {}
        for key in ("uncertainty", "ilm_uncertainty"):
            try:
                blocks[key] = (uncertainty_from_dict(doc[key]) if doc.get(key) else None)
            except ValueError as e:
                raise ValueError(f"{source}: bad `{key}` block ({e})") from None
        known = {"family", "rule", "t1", "t2", "t_ilm", "uncertainty", "ilm_uncertainty"}
        return cls(th, blocks["uncertainty"], blocks["ilm_uncertainty"], doc.get("family"),
                   doc.get("rule"), {k: v for k, v in doc.items() if k not in known})


def read_thresholds(path: str | Path) -> ThresholdsFile:
    """A thresholds YAML; ValueError (naming the file) when it is missing or malformed."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; run `hilm calibrate` to write it")
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a thresholds file (a YAML mapping with t1, t2, t_ilm)")
    return ThresholdsFile.from_doc(doc, str(path))


def write_thresholds(path: str | Path, tf: ThresholdsFile, header: str = "") -> None:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(tf.to_doc(), sort_keys=False, width=100))

