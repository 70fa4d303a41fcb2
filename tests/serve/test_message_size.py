"""One gRPC message limit on every server and channel: a cascade block of full 128k-vocabulary
rows crosses a real socket both ways; over a smaller limit the router's error names the flag.

The servicer is a stand-in that echoes the draft rows back as emitted rows (no 128k-vocabulary
model can run here); the server options, the router's link and its error mapping are the real
ones."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from hilm_vllm.netmodel import NetworkModel
from hilm_vllm.proto.hilm.v1 import verifier_pb2, verifier_pb2_grpc
from hilm_vllm.router.engine import _translate
from hilm_vllm.router.links import TierUsage, VerifierLink
from hilm_vllm.sampling import ScoredToken
from hilm_vllm.server.grpc_limits import MAX_MESSAGE_ENV, grpc_options
from hilm_vllm.tiers import Tier

VOCAB = 131_072  # a 128k vocabulary (Llama 3's is 128,256)
ROWS = 5  # k + 1 emitted tokens of a fully accepted block at k = 4


class Echo(verifier_pb2_grpc.VerifierServicer):
    async def Verify(self, request, context):
        return verifier_pb2.VerifyResponse(
            num_accepted=len(request.draft_token_ids) - 1, next_token_id=0,
            emitted=[verifier_pb2.EmittedToken(token_id=t, uncertainty=0.5, dist=d)
                     for t, d in zip(request.draft_token_ids, request.draft_dists)])


def full_row(token: int) -> ScoredToken:
    probs = np.full(VOCAB, 1.0 / VOCAB, np.float32)
    return ScoredToken(token, 0.5, np.arange(VOCAB, dtype=np.int32), probs)


async def verify_block() -> list[ScoredToken]:
    server = grpc.aio.server(options=grpc_options())
    verifier_pb2_grpc.add_VerifierServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    link = VerifierLink(Tier.LLM, f"127.0.0.1:{port}", NetworkModel(), "test", 60.0)
    try:
        out = await link.verify("s", 0, [], [full_row(t) for t in range(ROWS)], TierUsage(),
                                want_emitted=True)
        return out.emitted
    finally:
        await link.close()
        await server.stop(None)


def test_a_block_of_full_128k_rows_fits_the_default_limit(monkeypatch):
    monkeypatch.delenv(MAX_MESSAGE_ENV, raising=False)
    emitted = asyncio.run(verify_block())
    assert len(emitted) == ROWS and all(len(e.ids) == VOCAB for e in emitted)
    assert emitted[3].ids[-1] == VOCAB - 1 and emitted[3].probs.sum() == pytest.approx(1.0)


def test_over_the_limit_the_error_names_the_flag(monkeypatch):
    monkeypatch.setenv(MAX_MESSAGE_ENV, "1")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(verify_block())
    err = _translate(Tier.LLM, info.value)
    assert "--grpc-max-message-mb" in str(err) and "llm tier" in str(err)
    assert err.http_status == 500  # a deployment limit, not the client's rate


def test_a_bad_limit_is_refused(monkeypatch):
    monkeypatch.setenv(MAX_MESSAGE_ENV, "0")
    with pytest.raises(ValueError, match="grpc-max-message-mb"):
        grpc_options()
