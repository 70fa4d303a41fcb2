"""Worker extension of the drafter engine: the step hook and the side channel out of it.

Mixed into vLLM's worker class (`worker_extension_cls`); its methods run in the worker process,
where `processor.STORE` lives. `hilm_install_drafter(address, token)` (once, when the tier is
ready) wraps the runner's `_bookkeeping_sync`, which runs right after the sampler: `DraftHook`
finishes each drafter row's position there (`processor.collect_step`) and pushes the entries of
the whole step in one frame to the API process (`hilm_vllm.server.push`). Nothing goes through
the engine core; concurrent Drafts are ordinary requests batched by vLLM's scheduler.

The hook wraps a private method of vLLM 0.32.0's V1 model runner (`GPUModelRunner`, which
`CPUModelRunner` subclasses): it pins that version and that runner.
"""

from __future__ import annotations

import time

from hilm_vllm.drafter import processor
from hilm_vllm.server.busy import BusyWorkerExtension
from hilm_vllm.server.push import PushSink
from hilm_vllm.server.runner import check_v1_runner, pushes_results
from hilm_vllm_patches import shm_busy_loop


class DraftHook:
    """Wraps `_bookkeeping_sync` of one V1 runner; pushes each step's finished positions."""

    def __init__(self, runner, sink=None):
        self.runner, self.sink = runner, sink
        self.steps, self.hook_s = 0, 0.0
        self._bookkeeping_sync = runner._bookkeeping_sync
        runner._bookkeeping_sync = self.bookkeeping_sync

    def processor(self) -> processor.UncertaintyProcessor | None:
        procs = getattr(self.runner.input_batch, "logitsprocs", None)
        return next((p for p in (procs.non_argmax_invariant if procs else [])
                     if isinstance(p, processor.UncertaintyProcessor)), None)

    def bookkeeping_sync(self, scheduler_output, sampler_output, logits, hidden_states,
                         num_scheduled_tokens):
        """Same signature as the runner's; runs after the sampler, before the sampled tokens
        are appended to the requests' output lists."""
        proc = self.processor()
        if proc is not None and proc.rows:
            t0 = time.perf_counter()
            num_reqs = self.runner.input_batch.num_reqs
            skip = set(self.runner.discard_request_mask.np[:num_reqs].nonzero()[0].tolist())
            sampled = sampler_output.sampled_token_ids[:num_reqs, 0].tolist()
            entries = processor.collect_step(proc.rows, sampled, skip)
            if entries and self.sink is not None:
                self.sink.send([len(processor.STORE), entries])
            self.steps += 1
            self.hook_s += time.perf_counter() - t0
        return self._bookkeeping_sync(scheduler_output, sampler_output, logits, hidden_states,
                                      num_scheduled_tokens)


def check_runner(runner) -> None:

    check_v1_runner(runner, "drafter hook")


class DrafterWorkerExtension(BusyWorkerExtension):
    def hilm_install_drafter(self, channel: str | None = None, token: str = "") -> str:
        """Wrap the runner (once). With `channel` (a `PullChannel` address) results are pushed
        there and finished drafts are not kept; without, they are kept for `hilm_pop_draft`."""
        runner = self.model_runner
        hook = getattr(runner, "_hilm_draft_hook", None)
        installed = hook is not None
        if not installed:
            check_runner(runner)
            hook = runner._hilm_draft_hook = DraftHook(runner)
        first = pushes_results()  # under tensor parallelism only the first rank pushes
        if channel is not None:
            processor.STORE.keep_finished = False
            if first:

                hook.sink = PushSink(channel, token)
        state = "already installed" if installed else "installed"
        return state if first else f"{state} (a tensor-parallel rank: drafts, does not push)"

    def hilm_pop_draft(self, key: str) -> dict | None:
        """The finished draft `key` (see `processor.readout_of`), removed; None if unknown.
        Only without a push channel (in-process engines, tests, benchmarks)."""
        draft = processor.STORE.pop(key)
        return None if draft is None else draft.readout()

    def hilm_drafter_info(self) -> dict:
        """Which runner and processors this worker has, the hook, the records it holds, and
        the shm busy-loop window (checked once the engine is ready, and by the tests)."""

        runner = self.model_runner
        batch = getattr(runner, "input_batch", None)
        procs = getattr(batch, "logitsprocs", None)
        names = [type(p).__name__ for p in procs.all] if procs is not None else []
        hook = getattr(runner, "_hilm_draft_hook", None)
        return {"runner": f"{type(runner).__module__}.{type(runner).__qualname__}",
                "processors": names,
                "installed": any(isinstance(p, processor.UncertaintyProcessor)
                                 for p in (procs.non_argmax_invariant if procs else [])),
                "hook": hook is not None, "pushing": hook is not None and hook.sink is not None,
                "records": len(processor.STORE), "busy_loop": shm_busy_loop.state()}

    def hilm_drafter_stats(self, reset: bool = False) -> dict:
        """Cumulative processor cost (seconds in apply, calls, rows) for benchmarks."""
        stats = dict(processor.STATS)
        if reset:
            processor.STATS.update(apply_s=0.0, apply_calls=0, rows=0)
        return stats
