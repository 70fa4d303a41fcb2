"""A Draft's result and its protobuf, both ways: what the drafter tier answers and what its
clients (the router, calibration, benchmarks) read. Light on purpose: no vLLM, no engine code,
so that a client of the drafter does not load the drafter's logits processor."""

from __future__ import annotations

from dataclasses import dataclass

from hilm_vllm import codec
from hilm_vllm.proto.hilm.v1 import common_pb2, drafter_pb2
from hilm_vllm.sampling import ScoredToken


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
        token_id=t.token_id, uncertainty=t.uncertainty, dist=codec.dist_to_pb(t.ids, t.probs))
        for t in result.tokens]
    return drafter_pb2.DraftResponse(
        tokens=tokens, position=result.position, stopped_early=result.early_stop,
        timings=common_pb2.Timings(queue_ms=result.queue_ms, forward_ms=result.forward_ms,
                                   total_ms=result.total_ms))


def draft_result(r: drafter_pb2.DraftResponse) -> DraftResult:
    return DraftResult([codec.scored_from_pb(t) for t in r.tokens], r.position, r.stopped_early,
                       queue_ms=r.timings.queue_ms, forward_ms=r.timings.forward_ms,
                       total_ms=r.timings.total_ms)
