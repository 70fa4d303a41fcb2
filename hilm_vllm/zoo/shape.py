"""What every family of the zoo must be to run as SLM < ILM < LLM on vLLM's CPU backend."""

from __future__ import annotations

CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM's CPU attention


def check_shape(head_dim: int, slm_layers: int, ilm_layers: int, num_layers: int) -> None:
    """A family vLLM's CPU attention can run, with SLM < ILM < LLM exits (every recipe)."""
    if head_dim not in CPU_HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} is not supported by vLLM's CPU attention")
    if not 0 < slm_layers < ilm_layers < num_layers:
        raise ValueError("need 0 < slm_layers < ilm_layers < num_layers")
