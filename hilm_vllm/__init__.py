"""hilm-vllm: hierarchical, uncertainty-aware speculative inference on vLLM."""

__version__ = "0.1.0"

# The vLLM release whose internals our hooks touch (worker runner, logits processors).
PINNED_VLLM = "0.32.0"
