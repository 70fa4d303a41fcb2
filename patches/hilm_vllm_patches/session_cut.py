"""Cut a resumable (streaming-input) request back in place before its next chunk (vLLM 0.32.0).

vLLM 0.32's streaming-input requests (`AsyncLLM.generate` fed an async generator of
`StreamingInput`) keep one request, and its KV, alive across chunks:
`Scheduler._update_request_as_session` keeps every computed token and appends the next chunk's
tokens. They are append-only. A speculative session needs to cut back: a Verify's rejected
draft tokens were computed (they are in the KV and, once their block filled, in the prefix
cache under their hash), and a Draft's drafted tokens past what the verifier accepted are too.

This plugin wraps `_update_request_as_session`: a chunk whose `SamplingParams.extra_args`
holds `CUT_ARG` = c first cuts the request back to its first c tokens, then the chunk's tokens
are appended as vLLM does. In the engine core's bookkeeping:

- the tokens past c leave the request (prompt and outputs; `block_hashes` past the last full
  block before c);
- the request's blocks past the one holding token c - 1 are freed (a full block keeps its hash:
  its content is what the hash says, so another request may still hit it);
- the block holding the cut, if it is full and cached, would be overwritten in place while its
  hash still named the old tokens: a stale block served to the next request with that prefix.
  If the request holds it alone, its hash is dropped from the cache (the KV before the cut is
  still this request's) and the request writes on in it; if another request shares it (a
  prefix-cache hit on this request's content), the request leaves it to them and recomputes
  the tokens of that block before the cut (at most block_size - 1) in a fresh block;
- `num_cached_block` comes back to the full blocks before the cut, so the blocks filled after
  the cut are hashed by their new content.

Nothing before the cut is sent, hashed or computed again. A cut at or past what the request has
computed is a no-op. Only full attention is cut in place: a model with another KV-cache layout
(sliding window, Mamba) has all its blocks freed and its kept tokens computed again from the
prefix cache, exact but not cheap. The wrapped method is private: the plugin refuses other vLLM
versions.
"""

from __future__ import annotations

import math

PINNED_VLLM = "0.32.0"
CUT_ARG = "hilm_cut"  # SamplingParams.extra_args key: keep this many tokens, then append

replaced = None  # vLLM's Scheduler._update_request_as_session, once register() wrapped it


def cut_back(scheduler, request, cut: int) -> int | None:
    """Cut `request` (resumable, between chunks) back to its first `cut` tokens in the engine
    core's scheduler and KV-cache manager. Returns the position from which tokens must be
    computed again when the block holding the cut was shared (else None)."""
    if cut < request.num_prompt_tokens:
        del request.prompt_token_ids[cut:]
        request.num_prompt_tokens = cut
    # `_update_request_as_session` keeps _all_token_ids[:num_computed_tokens], moves the
    # outputs among them into the prompt and truncates block_hashes at this length.
    request.num_computed_tokens = cut
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    if cut == 0 or any(type(m).__name__ != "FullAttentionManager" for m in managers):
        recompute_from = 0
    else:
        recompute_from = _cut_blocks(managers, request.request_id, cut)
    if recompute_from == 0:
        # Nothing kept: the request starts over as a new one (its bookkeeping gone, so the
        # scheduler looks its tokens up in the prefix cache, as vLLM does after a preemption).
        for manager in managers:
            manager.free(request.request_id)
    return recompute_from


def _cut_blocks(managers, request_id: str, cut: int) -> int | None:
    recompute_from = None
    for manager in managers:
        blocks = manager.req_to_blocks.get(request_id)
        if not blocks:
            continue
        size, pool = manager.block_size, manager.block_pool
        keep = math.ceil(cut / size)
        dropped = blocks[keep:]
        del blocks[keep:]
        pool.free_blocks(reversed(dropped))  # tail first, as vLLM frees
        if cut % size and blocks and blocks[-1].block_hash is not None:
            partial = blocks[-1]
            if partial.ref_cnt == 1:
                pool._maybe_evict_cached_block(partial)
            else:  # shared: leave it to the others, recompute its head in a fresh block
                blocks.pop()
                pool.free_blocks([partial])
                start = (cut // size) * size
                recompute_from = start if recompute_from is None else min(recompute_from, start)
        cached = manager.num_cached_block.get(request_id)
        if cached is not None:
            manager.num_cached_block[request_id] = min(cached, cut // size)
    return recompute_from


def _update_request_as_session(self, session, update):
    params = update.sampling_params if update is not None else None
    cut = (params.extra_args or {}).get(CUT_ARG) if params is not None else None
    recompute_from = None
    if cut is not None and 0 <= int(cut) < session.num_computed_tokens:
        recompute_from = cut_back(self, session, int(cut))
    replaced(self, session, update)
    if recompute_from is not None:
        session.num_computed_tokens = recompute_from


def register() -> None:
    """`vllm.general_plugins` entry point (runs in the API process, engine core and workers)."""
    import vllm
    from vllm.logger import init_logger

    global replaced
    if vllm.__version__.split("+")[0] != PINNED_VLLM:
        init_logger("vllm.hilm_patches").warning(
            "vLLM is %s, not %s: resumable sessions cannot be cut back (hilm tiers refuse to "
            "start)", vllm.__version__, PINNED_VLLM)
        return
    from vllm.v1.core.sched.scheduler import Scheduler

    if Scheduler._update_request_as_session is not _update_request_as_session:
        replaced = Scheduler._update_request_as_session
        Scheduler._update_request_as_session = _update_request_as_session
        init_logger("vllm.hilm_patches").debug("hilm: resumable sessions can be cut back")


def installed() -> bool:
    from vllm.v1.core.sched.scheduler import Scheduler

    return Scheduler._update_request_as_session is _update_request_as_session
