"""Worker extension of the drafter engine: the side channel out of the logits processor.

Mixed into vLLM's worker class (`worker_extension_cls`); its methods run in the worker process,
where `processor.STORE` lives, and are called with `collective_rpc(name, args=...)`: one call per
Draft, ~0.2-0.3 ms.
"""

from __future__ import annotations

from hilm_vllm.drafter import processor


class DrafterWorkerExtension:
    def hilm_pop_draft(self, key: str) -> dict | None:
        """The finished draft `key` (see `processor.Draft.readout`), removed; None if unknown."""
        draft = processor.STORE.pop(key)
        return None if draft is None else draft.readout()

    def hilm_drafter_info(self) -> dict:
        """Which runner and processors this worker has (checked once the engine is ready)."""
        runner = self.model_runner
        batch = getattr(runner, "input_batch", None)
        procs = getattr(batch, "logitsprocs", None)
        names = [type(p).__name__ for p in procs.all] if procs is not None else []
        return {"runner": f"{type(runner).__module__}.{type(runner).__qualname__}",
                "processors": names,
                "installed": any(isinstance(p, processor.UncertaintyProcessor)
                                 for p in (procs.non_argmax_invariant if procs else []))}

    def hilm_drafter_stats(self, reset: bool = False) -> dict:
        """Cumulative processor cost (seconds in apply, calls, rows) for benchmarks."""
        stats = dict(processor.STATS)
        if reset:
            processor.STATS.update(apply_s=0.0, apply_calls=0, rows=0)
        return stats
