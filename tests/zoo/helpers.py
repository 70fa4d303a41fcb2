"""What the zoo tests share."""

from __future__ import annotations

import torch


def greedy_transformers(model_dir, prompt_ids: list[int], n: int) -> list[int]:
    """n greedy tokens after prompt_ids from transformers in float32 (the reference vLLM's T = 0
    output must equal)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids):].tolist()
