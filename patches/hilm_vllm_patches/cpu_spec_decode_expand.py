"""Fix: vLLM 0.32 CPU speculative decoding samples from garbage target probabilities at T > 0.

`vllm/utils/cpu_triton_utils.py::_expand_kernel_impl` hands `_ensure_int64(output)` to the
C++ op. For a float32 `output` (temperature, top_p) that is a temporary int64 copy, so the
op writes into the copy and `expand_batch_to_tokens()` returns uninitialised memory.
`RejectionSampler.apply_sampling_constraints()` uses it to expand per-request temperature,
top-k and top-p to per-draft-token values, so at temperature > 0 the target probabilities are
NaN or one-hot: acceptance collapses and the output is not the target's distribution.
Greedy (T = 0) never reaches it.

The fix replaces `expand_batch_to_tokens` in the rejection sampler's module with a
`repeat_interleave` equivalent that is dtype-preserving. CPU only; GPU uses the Triton kernel.
"""

from __future__ import annotations

import torch

PINNED_VLLM = "0.32.0"

# vLLM's own function, once register() has replaced it (plugins load in every process).
replaced = None


def expand_batch_to_tokens(
    x: torch.Tensor,  # [batch_size]
    cu_num_tokens: torch.Tensor,  # [batch_size], cumulative tokens per request
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:  # [num_tokens]
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    out = torch.repeat_interleave(x, counts, output_size=num_tokens)
    return torch.where(out == replace_from, torch.as_tensor(replace_to, dtype=out.dtype), out)


def register() -> None:
    """`vllm.general_plugins` entry point."""
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or vllm.__version__ != PINNED_VLLM:
        return  # a newer vLLM may have fixed it differently; never patch blind
    import vllm.v1.sample.rejection_sampler as rejection_sampler

    global replaced
    if rejection_sampler.expand_batch_to_tokens is not expand_batch_to_tokens:
        replaced = rejection_sampler.expand_batch_to_tokens  # kept for the regression test
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
