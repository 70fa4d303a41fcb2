"""The drafter's proposal as pure math: truncation, the draw, the packed rows, and the perturbed
gate's law (no engine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from hilm_vllm import codec
from hilm_vllm.errors import InvalidArgument
from hilm_vllm.rejection import SparseRows
from hilm_vllm.seeds import Stream, derive_seed
from hilm_vllm.sampling import (NO_TRUNCATION, SamplingSpec, Truncation, draw, pack_row,
                                processed_probs, processed_probs_batch, seed_uniform, truncate,
                                truncated_probs, unpack_row)
from hilm_vllm.uncertainty import (UncertaintyConfig, disagreement, draw_samples, noise,
                                   perturbed_disagreement, perturbed_u)

META = torch.device("meta")


def peaked(v: int = 500, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, generator=g) * 3


def test_truncate_keeps_the_smallest_set_holding_one_minus_eps_at_most_cap():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.04, 0.01]])
    ids, w = truncate(p, Truncation(cap=4, eps=0.1))
    kept = w[0] > 0
    assert ids[0][kept].tolist() == [0, 1, 2]  # 0.5 + 0.3 < 0.9 <= 0.95: three tokens
    assert w[0][kept].tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95], abs=1e-3)
    ids, w = truncate(p, Truncation(cap=2, eps=0.0))
    assert ids[0].tolist() == [0, 1] and float(w.sum()) == pytest.approx(1, abs=1e-3)
    ids, w = truncate(p, NO_TRUNCATION)
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3, 4]
    # float16 weights: what travels is exactly what is drawn from
    assert torch.equal(w, w.half().float())


def test_truncation_refuses_bad_values():
    for bad in (dict(cap=-1), dict(eps=1.0), dict(eps=-1e-9), dict(eps=float("nan"))):
        with pytest.raises(ValueError):
            Truncation(**bad)


def test_greedy_rows_are_one_hot_on_the_argmax():
    z = peaked()[None]
    ids, w = truncate(processed_probs(z, SamplingSpec(0.0)), Truncation())
    assert int(ids[0, 0]) == int(z.argmax()) and w[0, 0] == 1 and float(w[0, 1:].sum()) == 0


def test_draw_follows_the_weights_and_never_draws_a_zero():
    w = torch.tensor([[0.5, 0.0, 0.25, 0.25]])
    n = 20_000
    counts = np.zeros(4)
    for i in range(n):
        counts[int(draw(w, torch.tensor([seed_uniform(derive_seed(7, i, Stream.DRAFT_DRAW))])))] += 1
    assert counts[1] == 0
    assert stats.chisquare(counts[[0, 2, 3]], np.array([0.5, 0.25, 0.25]) * n).pvalue > 1e-3
    # edge uniforms stay inside the support
    assert draw(w, torch.tensor([0.0])).item() == 0
    assert draw(w, torch.tensor([1 - 2 ** -53])).item() == 3


def test_seed_uniform_is_in_zero_one():
    for s in (0, 1, (1 << 63) - 1, 12345):
        assert 0 <= seed_uniform(s) < 1


def test_processed_probs_batch_equals_each_row_alone():
    z = torch.stack([peaked(seed=i) for i in range(5)])
    specs = [SamplingSpec(0.7), SamplingSpec(1.0, 20), SamplingSpec(1.3, 0, 0.8),
             SamplingSpec(0.0), SamplingSpec(0.9, 50, 0.9)]
    batch = processed_probs_batch(z, specs)
    for i, spec in enumerate(specs):
        alone = processed_probs(z[i:i + 1], spec)[0]
        assert torch.allclose(batch[i], alone, atol=1e-6), spec


def test_packed_rows_round_trip_and_drop_zero_weights():
    ids = np.array([7, 3, 9], np.int64)
    w = np.array([0.75, 0.25, 0.0], np.float32)
    i, p = unpack_row(*pack_row(ids, w))
    assert i.tolist() == [7, 3] and p.tolist() == [0.75, 0.25]
    assert len(pack_row(ids, w)[0]) == 8 and len(pack_row(ids, w)[1]) == 4  # 6 bytes an entry


def test_codec_packs_float16_rows_and_keeps_others_exact():
    ids, w = np.array([1, 5], np.int32), np.array([0.5, 0.5], np.float32)
    pb = codec.dist_to_pb(ids, w)
    assert pb.packed_token_ids and not pb.token_ids and pb.ByteSize() < 20
    got = codec.dist_from_pb(pb)
    assert got[0].tolist() == [1, 5] and got[1].tolist() == [0.5, 0.5]
    exact = np.array([1 / 3, 2 / 3], np.float32)  # not float16 values: never rounded
    pb = codec.dist_to_pb(ids, exact)
    assert not pb.packed_token_ids and np.array_equal(codec.dist_from_pb(pb)[1], exact)
    bad = codec.common_pb2.SparseDistribution(packed_token_ids=b"\0" * 8, packed_weights=b"\0" * 2)
    with pytest.raises(InvalidArgument, match="pair up"):
        codec.dist_from_pb(bad)
    both = codec.common_pb2.SparseDistribution(packed_token_ids=b"\0" * 4,
                                               packed_weights=b"\0" * 2, token_ids=[1])
    with pytest.raises(InvalidArgument, match="one encoding"):
        codec.dist_from_pb(both)


def test_sparse_rows_normalise_weights_per_row():
    q = SparseRows.from_lists([(np.array([1, 2]), np.array([0.5, 0.5005], np.float32)),
                               ([0], [0.999])]).normalised()
    assert q.probs.tolist() == pytest.approx([0.5 / 1.0005, 0.5005 / 1.0005, 1.0], abs=1e-7)


def test_truncated_probs_are_the_normalised_weights():
    p = processed_probs(peaked()[None], SamplingSpec(1.0))
    dense, ids, w = truncated_probs(p, Truncation(16, 1e-3))
    assert float(dense.sum()) == pytest.approx(1, abs=1e-6)
    assert torch.allclose(dense[0, ids[0]], (w[0] / w[0].sum()), atol=1e-7)
    assert int((dense > 0).sum()) <= 16


def test_temperatures_below_vllms_floor_are_raised_as_vllm_does():
    assert SamplingSpec(0.001).temperature == 0.01 and not SamplingSpec(0.001).greedy
    assert SamplingSpec(0.0).greedy and SamplingSpec(0.5).temperature == 0.5


def test_perturbed_disagreement_has_the_law_of_the_sampled_gate():
    # Same law as (1/K) sum 1[x_k != x] with x_k drawn (draw_samples), for a fixed token.
    z = peaked(200, seed=3) / 2
    cfg = UncertaintyConfig(num_samples=20)
    token = int(z.argsort(descending=True)[1])
    fast = np.array([perturbed_u(z, token, cfg, s) for s in range(800)])
    slow = np.array([disagreement(draw_samples(z, cfg, s + 10**6), token) for s in range(800)])
    assert abs(fast.mean() - slow.mean()) < 0.02
    assert stats.ks_2samp(fast, slow).pvalue > 1e-3
    assert np.allclose(fast * 20, np.round(fast * 20))  # steps of 1/K


def test_perturbed_disagreement_batch_equals_rows_alone():
    z = torch.stack([peaked(300, seed=i) for i in range(3)])
    cfg = UncertaintyConfig()
    draws = [noise(cfg, s) for s in (5, 6, 7)]
    tokens = torch.tensor([0, 1, 2])
    batch = perturbed_disagreement(z, tokens, torch.stack([t for t, _ in draws]),
                                   torch.stack([u for _, u in draws]))
    alone = [perturbed_u(z[i], i, cfg, s) for i, s in enumerate((5, 6, 7))]
    assert batch.tolist() == alone


def test_proposal_functions_keep_their_work_on_the_input_device():
    p = torch.empty(4, 1000, device=META)
    ids, w = truncate(p, Truncation(32, 1e-3))
    assert ids.device == META and w.device == META
    dense, _, _ = truncated_probs(p, Truncation(32, 1e-3))
    assert dense.device == META
    assert draw(torch.empty(4, 32, device=META), torch.rand(4, dtype=torch.float64)).device == META
    cfg = UncertaintyConfig()
    t, u = noise(cfg, 1)
    out = perturbed_disagreement(torch.empty(2, 1000, device=META),
                                 torch.zeros(2, dtype=torch.long, device=META),
                                 torch.stack([t, t]), torch.stack([u, u]))
    assert out.device == META
