"""The pure tensor functions on a real CUDA device: same numbers and same draws as on the CPU.

Skipped without CUDA (CI has none; tests/test_device_placement.py catches device mixing there
with meta tensors). `make gpu-check` runs this file on a GPU machine. What the hooks compute on
a GPU tier: the drafter's proposal (processed rows, truncation, the seeded draw), its
uncertainty, and the verifier's accept / recover / bonus step. Draws come from CPU generators,
so a seed gives the same tokens on every device; values may differ in the last bits (other
kernels), so rows are compared with a tolerance and draws where the rows agree.
"""

from __future__ import annotations

import pytest
import torch

from hilm_vllm.rejection import SparseRows, verify_block
from hilm_vllm.sampling import (SamplingSpec, Truncation, draw, seed_uniform, truncate,
                                truncated_probs)
from hilm_vllm.seeds import Stream, derive_seed
from hilm_vllm.uncertainty import (TOKEN_FREE_GATES, UncertaintyConfig, noise,
                                   perturbed_disagreement)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
V = 32_000


def peaked(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 4


def softmax_rows(z: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    return torch.softmax(z / t, dim=-1)


@pytest.mark.parametrize("trunc", [Truncation(), Truncation(8, 0.05), Truncation(0, 0.0)])
def test_truncation_and_the_draw_match_the_cpu(trunc):
    z = peaked(6)
    ids_c, w_c = truncate(softmax_rows(z), trunc)
    ids_g, w_g = truncate(softmax_rows(z.to(CUDA)), trunc)
    assert ids_g.device.type == "cuda" and w_g.device.type == "cuda"
    assert torch.equal(ids_g.cpu()[:, :8], ids_c[:, :8])  # the likely head: no near-ties here
    assert torch.allclose(w_g.cpu(), w_c, atol=2e-3)
    u = torch.tensor([seed_uniform(derive_seed(3, i, Stream.DRAFT_DRAW)) for i in range(6)],
                     dtype=torch.float64)
    picked_c = ids_c.gather(1, draw(w_c, u)[:, None])
    picked_g = ids_g.gather(1, draw(w_g, u)[:, None])
    assert picked_g.device.type == "cuda"
    assert (picked_g.cpu() == picked_c).float().mean() >= 5 / 6  # equal unless at a cdf edge


def test_truncated_probs_stay_on_the_gpu_and_sum_to_one():
    dense, ids, w = truncated_probs(softmax_rows(peaked(3).to(CUDA)), Truncation())
    assert dense.device.type == ids.device.type == w.device.type == "cuda"
    assert torch.allclose(dense.sum(-1), torch.ones(3, device=CUDA), atol=1e-5)


def test_uncertainty_gates_match_the_cpu():
    z = peaked(4, seed=1)
    cfg = UncertaintyConfig()
    draws = [noise(cfg, s) for s in range(4)]
    thetas, uniforms = torch.stack([t for t, _ in draws]), torch.stack([u for _, u in draws])
    tokens = z.argmax(-1)
    cpu = perturbed_disagreement(z, tokens, thetas, uniforms)
    gpu = perturbed_disagreement(z.to(CUDA), tokens.to(CUDA), thetas, uniforms)
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    for gate, fn in TOKEN_FREE_GATES.items():
        assert torch.allclose(fn(z.to(CUDA)).cpu(), fn(z), atol=1e-5), gate


@pytest.mark.parametrize("greedy", [False, True])
def test_verify_block_on_the_gpu_gives_the_cpus_outcome(greedy):
    n = 4
    p = softmax_rows(peaked(n + 1, seed=2), 1.5)
    q_rows = softmax_rows(peaked(n, seed=3), 1.5)
    ids, w = truncate(q_rows, Truncation())
    draft = ids[:, 0].clone()
    q = SparseRows.from_lists([(i[x > 0].numpy(), x[x > 0].numpy()) for i, x in zip(ids, w)])
    cpu = verify_block(p[:n], draft, q.normalised(), torch.Generator().manual_seed(7), greedy,
                       bonus=p[n])
    pg = p.to(CUDA)
    gpu = verify_block(pg[:n], draft, q.normalised(), torch.Generator().manual_seed(7), greedy,
                       bonus=pg[n])
    assert gpu.target_probs.device.type == "cuda"
    assert (gpu.num_accepted, gpu.next_token) == (cpu.num_accepted, cpu.next_token)


def test_processed_probs_with_vllms_kernels_on_the_gpu():
    pytest.importorskip("vllm")
    from hilm_vllm.sampling import processed_probs, processed_probs_batch

    z = peaked(3)
    specs = [SamplingSpec(0.7, 50), SamplingSpec(1.0, 0, 0.9), SamplingSpec(0.0)]
    batch = processed_probs_batch(z.to(CUDA), specs)
    assert batch.device.type == "cuda"
    for i, spec in enumerate(specs):
        assert torch.allclose(batch[i].cpu(), processed_probs(z[i:i + 1], spec)[0], atol=1e-5)
