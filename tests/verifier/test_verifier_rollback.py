"""`VerifyRequest.rollback_to`: a session cut back to tokens another tier overruled."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from hilm_vllm.proto.hilm.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from tests.verifier.helpers import greedy_draft, heldout_prompts, served


@pytest.fixture(scope="module")
def llm(tiny_zoo):
    with served("llm", tiny_zoo.llm) as proc:
        yield proc


def _greedy():
    return common_pb2.SamplingParams(temperature=0.0)


async def _session(stub, ids):
    r = await stub.OpenSession(verifier_pb2.OpenVerifierSessionRequest(
        prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ids)), sampling=_greedy()))
    return r.session_id, r.position


def test_rollback_then_verify_equals_a_fresh_session(llm, tiny_zoo):
    prompt = heldout_prompts(tiny_zoo, 1)[0]
    truth = greedy_draft(tiny_zoo.llm, prompt, 6)

    async def run():
        async with grpc.aio.insecure_channel(llm.grpc_address) as ch:
            stub = verifier_pb2_grpc.VerifierStub(ch)
            sid, pos = await _session(stub, prompt)
            # the session takes 3 wrong tokens unverified (as if another tier had said so)
            r = await stub.Verify(verifier_pb2.VerifyRequest(
                session_id=sid, position=pos, append_token_ids=[7, 7, 7]))
            assert r.position == pos + 4
            # cut them, append the true first token, verify the next four true ones as a draft
            dist = [common_pb2.SparseDistribution(token_ids=[t], probs=[1.0]) for t in truth[1:5]]
            r = await stub.Verify(verifier_pb2.VerifyRequest(
                session_id=sid, position=pos + 4, rollback_to=pos,
                append_token_ids=truth[:1], draft_token_ids=truth[1:5], draft_dists=dist))
            assert (r.num_accepted, r.next_token_id, r.position) == (4, truth[5], pos + 6)
            bad = []
            for cut in (pos - 1, pos + 7):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Verify(verifier_pb2.VerifyRequest(
                        session_id=sid, position=pos + 6, rollback_to=cut))
                bad.append((e.value.code(), e.value.details()))
            # still serving, and the session is where it was
            r = await stub.Verify(verifier_pb2.VerifyRequest(session_id=sid, position=pos + 6))
            assert r.position == pos + 7
            return bad

    for code, details in asyncio.run(run()):
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "rollback_to" in details
