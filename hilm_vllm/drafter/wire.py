"""The drafter's messages as its clients see them: every request a client sends a drafter tier
(`hilm.v1.Drafter`) is built here, once, for both the typed client (`drafter/client.py`) and the
router's link (`router/links.py`, which adds usage, timeouts and the network model around the
same messages); a Draft's result and its protobuf, both ways. No engine code: the router
imports this, not the drafter's logits processor."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from hilm_vllm import codec
from hilm_vllm.proto.hilm.v1 import common_pb2, drafter_pb2
from hilm_vllm.sampling import SamplingSpec, ScoredToken
from hilm_vllm.uncertainty import UncertaintyConfig


@dataclass(frozen=True)
class OpenedDraftSession:
    session_id: str
    position: int
    prompt_token_ids: tuple[int, ...]
    eos_token_id: int  # -1 when the model names none
    vocab_size: int


@dataclass(frozen=True)
class DraftResult:
    tokens: list[ScoredToken]
    position: int
    early_stop: bool = False  # ended by stop_uncertainty (the forced stop token is dropped)
    queue_ms: float = 0.0
    forward_ms: float = 0.0
    total_ms: float = 0.0


def draft_response(result: DraftResult) -> drafter_pb2.DraftResponse:
    tokens = [drafter_pb2.DraftedToken(
        token_id=t.token_id, uncertainty=t.uncertainty, dist=codec.dist_to_pb(t.ids, t.probs),
        logprob=None if t.logprob is None else codec.logprob_to_pb(t.logprob))
        for t in result.tokens]
    return drafter_pb2.DraftResponse(
        tokens=tokens, position=result.position, stopped_early=result.early_stop,
        timings=common_pb2.Timings(queue_ms=result.queue_ms, forward_ms=result.forward_ms,
                                   total_ms=result.total_ms))


def draft_result(r: drafter_pb2.DraftResponse) -> DraftResult:
    return DraftResult([dataclasses.replace(codec.scored_from_pb(t), logprob=codec.logprob_from_pb(
        t.logprob)) if t.HasField("logprob") else codec.scored_from_pb(t) for t in r.tokens],
                       r.position, r.stopped_early,
                       queue_ms=r.timings.queue_ms, forward_ms=r.timings.forward_ms,
                       total_ms=r.timings.total_ms)


def open_request(prompt: Sequence[int] | str, spec: SamplingSpec,
                 uncertainty: UncertaintyConfig | None = None, max_tokens: int = 0,
                 min_tokens: int = 0, stop_token_ids: Sequence[int] = (),
                 logprobs: int | None = None) -> drafter_pb2.OpenDrafterSessionRequest:
    request = drafter_pb2.OpenDrafterSessionRequest(
        prompt=codec.prompt_to_pb(prompt), sampling=codec.sampling_to_pb(spec),
        max_tokens=max_tokens, min_tokens=min_tokens, stop_token_ids=list(stop_token_ids))
    if logprobs is not None:
        request.logprobs = logprobs
    if uncertainty is not None:
        request.uncertainty.CopyFrom(codec.uncertainty_to_pb(uncertainty))
    return request


def opened_session(r: drafter_pb2.OpenDrafterSessionResponse) -> OpenedDraftSession:
    return OpenedDraftSession(r.session_id, r.position, tuple(r.prompt_token_ids),
                              r.eos_token_id, r.vocab_size)


def draft_request(session_id: str, position: int, max_tokens: int,
                  stop_uncertainty: float | None = None, rollback_to: int | None = None,
                  append: Sequence[int] = ()) -> drafter_pb2.DraftRequest:
    """Draft after cutting the session to `rollback_to` and appending `append`; `position` is
    where the session is before both (as in Verify): one device call per round."""
    request = drafter_pb2.DraftRequest(session_id=session_id, position=position,
                                       max_tokens=max_tokens, append_token_ids=list(append))
    if stop_uncertainty is not None:
        request.stop_uncertainty = stop_uncertainty
    if rollback_to is not None:
        request.rollback_to = rollback_to
    return request


def close_request(session_id: str) -> drafter_pb2.CloseDrafterSessionRequest:
    return drafter_pb2.CloseDrafterSessionRequest(session_id=session_id)
