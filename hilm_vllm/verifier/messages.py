"""The verifier's requests and replies as its clients see them: every request a client sends a
verifier tier (`hilm.v1.Verifier`, `hilm.v1.Generator`) is built here, once, for both the typed
client (`verifier/client.py`: tests, benchmarks, calibration) and the router's link
(`router/links.py`, which adds usage, timeouts and the network model around the same
messages). No engine code: the router imports this."""

from __future__ import annotations

import json

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hilm_vllm import codec
from hilm_vllm.proto.hilm.v1 import generate_pb2, verifier_pb2
from hilm_vllm.sampling import SamplingSpec, TokenLogprob
from hilm_vllm.uncertainty import UncertaintyConfig

Prompt = list[int] | str
Dist = tuple[Sequence[int], Sequence[float]]  # (token ids, probabilities) of a sparse row


@dataclass(frozen=True)
class OpenedSession:
    session_id: str
    position: int
    prompt_token_ids: tuple[int, ...]
    eos_token_id: int
    vocab_size: int
    max_block: int
    eos_token_ids: tuple[int, ...] = ()  # every id the model stops on
    max_model_len: int = 0


@dataclass(frozen=True)
class GenerateChunk:
    token_ids: tuple[int, ...]  # new since the previous chunk
    text: str
    finish_reason: str | None  # set on the last chunk
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when asked
    # first chunk, when asked: one per prompt token after the first (vLLM's prompt_logprobs)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


def open_request(prompt: Prompt | Sequence[int], spec: SamplingSpec, max_tokens: int = 0,
                 min_tokens: int = 0, stop_token_ids: Sequence[int] = ()
                 ) -> verifier_pb2.OpenVerifierSessionRequest:
    return verifier_pb2.OpenVerifierSessionRequest(
        prompt=codec.prompt_to_pb(prompt), sampling=codec.sampling_to_pb(spec),
        max_tokens=max_tokens, min_tokens=min_tokens, stop_token_ids=list(stop_token_ids))


def opened_session(r: verifier_pb2.OpenVerifierSessionResponse) -> OpenedSession:
    return OpenedSession(r.session_id, r.position, tuple(r.prompt_token_ids), r.eos_token_id,
                         r.vocab_size, r.max_block, tuple(r.eos_token_ids), r.max_model_len)


def verify_request(session_id: str, position: int, draft: Sequence[int] = (),
                   dists: Sequence[Dist] = (), append: Sequence[int] = (),
                   want_target_probs: bool = False, want_emitted: bool = False,
                   uncertainty: UncertaintyConfig | None = None,
                   rollback_to: int | None = None,
                   logprobs: int | None = None) -> verifier_pb2.VerifyRequest:
    """One round: cut back to `rollback_to` (then `position` is after it), append `append`,
    verify `draft`, each token with the sparse q it was drawn from (`dists`)."""
    request = verifier_pb2.VerifyRequest(
        session_id=session_id, position=position, append_token_ids=list(append),
        draft_token_ids=list(draft), return_target_probs=want_target_probs,
        draft_dists=[codec.dist_to_pb(np.asarray(i), np.asarray(p)) for i, p in dists],
        return_emitted=want_emitted)
    if uncertainty is not None:
        request.uncertainty.CopyFrom(codec.uncertainty_to_pb(uncertainty))
    if rollback_to is not None:
        request.rollback_to = rollback_to
    if logprobs is not None:
        request.logprobs = logprobs
    return request


def close_request(session_id: str) -> verifier_pb2.CloseVerifierSessionRequest:
    return verifier_pb2.CloseVerifierSessionRequest(session_id=session_id)


def generate_request(prompt: Prompt | Sequence[int], spec: SamplingSpec, max_tokens: int = 0,
                     ignore_eos: bool = False, stop_token_ids: Sequence[int] = (),
                     min_tokens: int = 0, stop: Sequence[str] = (),
                     penalties: Mapping | None = None, logprobs: int | None = None,
                     structured: Mapping | None = None, prompt_logprobs: int | None = None
                     ) -> generate_pb2.GenerateRequest:
    """`penalties`: vLLM's sampler transforms (codec.PENALTY_FIELDS), which the tier's own
    sampler applies."""
    request = generate_pb2.GenerateRequest(
        prompt=codec.prompt_to_pb(prompt), sampling=codec.sampling_to_pb(spec),
        max_tokens=max_tokens, ignore_eos=ignore_eos, stop_token_ids=list(stop_token_ids),
        min_tokens=min_tokens, stop=list(stop))
    if penalties:
        request.penalties.CopyFrom(codec.penalties_to_pb(penalties))
    if logprobs is not None:
        request.logprobs = logprobs
    if structured:
        request.structured_outputs = json.dumps(dict(structured))
    if prompt_logprobs is not None:
        request.prompt_logprobs = prompt_logprobs
    return request
