"""Block verification inside vLLM's worker process ("route B" in research/vllm-0.32-notes.md §2.2).

A verification is one chunk of the session's long-lived vLLM request (`server/engine_session.py`):
the request's tokens end with context + draft, max_tokens = 1, `VerifyArgs` in the chunk's
`extra_args`. Its forward pass computes the hidden states of every token the request did not
hold (the chunk always starts at or before the draft's first row); this hook, run right after the sampler, turns the
n + 1 rows that predict the n draft tokens and the token after them into the target's processed
p [n + 1, V] (one `compute_logits` and one processed-p pass per engine step, over the rows of
every verification in the step, each row with its request's own sampling spec), applies
`rejection.verify_block` per request,
and overwrites the token the engine sampled at the last position with its own: the recovered
token on a rejection, else the bonus token, drawn from p_{n+1}, the row it ships. The engine's
own sample is never emitted: it comes from the engine's batch logits, which on GPU (bf16,
another matmul shape, FlashInfer's sampler) can differ from the hook's row enough to move a
top-k/top-p boundary, and then the emitted bonus token could have p = 0 in the row the hook
ships. Randomness (accept uniforms, then the one recovered or bonus draw) comes from a CPU
generator seeded with `VerifyArgs.draw_seed`: the same draws on every device. Full rows never
leave this process; the outcome is pushed to the API process (channel.py); only an outcome whose
push was dropped (or with no channel installed) is kept here for
`collective_rpc("hilm_pop_verify", key)`.

Emitted tokens (only when `VerifyArgs.emit` asks; otherwise nothing below runs or is kept). Such
a request verifies against its p TRUNCATED as `EmitArgs.truncation` says (`sampling.
truncated_probs`: at most cap entries holding mass >= 1 - eps, float16 weights): every token it
emits (the accepted drafts, then the correction or bonus token) is an exact sample of that law,
and the hook ships exactly that row (ids and float16 weights, 6 bytes an entry) with the token,
plus the verifier's own uncertainty u of it: `hilm_vllm.uncertainty`'s gates on the RAW row,
perturbation noise seeded from (session noise seed, absolute position) on the drafter's noise
stream, exactly as the drafter's processor does. A next tier verifies them as a draft with q =
that row and stays exact; the rows stay small on any vocabulary.

Structured outputs: a request whose spec carries a constraint (`sampling.Structured`) has each
row masked with its grammar's bitmask before anything else (`server/grammar.py`: the session's
tracker, keyed by the request, after the output tokens before the row, the draft tokens
included), as vLLM masks its logits before the sampler; the raw logprobs see the mask, as
vLLM's do.

The hook wraps two methods of vLLM 0.32's V1 model runner (`GPUModelRunner`, subclassed by
`CPUModelRunner`), so it pins that version and that runner.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import time
from dataclasses import dataclass, field

import torch

from hilm_vllm.rejection import BlockOutcome, verify_block
from hilm_vllm.sampling import (apply_bitmask, pack_row, processed_probs_batch,
                                token_logprobs, truncated_probs)
from hilm_vllm.seeds import Stream, derive_seed
from hilm_vllm.server import memtrace
from hilm_vllm.server.grammar import RowGrammars
from hilm_vllm.server.runner import check_v1_runner, pushes_results
from hilm_vllm.uncertainty import TOKEN_FREE_GATES, perturbed_u
from hilm_vllm.verifier.channel import ResultSink
from hilm_vllm.verifier.wire import (EXTRA_ARGS_KEY, ROWS_CACHED, EmittedRow, VerifyArgs,
                                     VerifyResult)

SUPPORTED_VLLM = "0.32.0"  # the wrapped runner methods are private: re-check them on upgrade
# Results kept for hilm_pop_verify (only those the channel could not take) and partial rows of
# aborted requests are dropped oldest-first beyond this many.
MAX_PENDING = 4096


class VerifierWorkerExtension:
    """Mixed into vLLM's worker class by `worker_extension_cls`; called via `collective_rpc`."""

    def hilm_install_verifier(self, channel: str | None = None, token: str = "") -> str:
        """Wrap the runner (once); results are also pushed to `channel` (channel.py) if given."""
        runner = self.model_runner
        installed = getattr(runner, "_hilm_verify_hook", None) is not None
        if not installed:
            check_runner(runner)
            runner._hilm_verify_hook = VerifyHook(runner)
        first = pushes_results()
        runner._hilm_verify_hook.keep_results = first
        if channel is not None and first:

            runner._hilm_verify_hook.sink = ResultSink(channel, token)
        state = "already installed" if installed else "installed"
        return state if first else f"{state} (a tensor-parallel rank: decides, does not push)"

    def hilm_pop_verify(self, key: str) -> dict | None:
        return self.model_runner._hilm_verify_hook.pop(key)

    def hilm_verify_stats(self) -> dict:
        """Counters since install: {"verified": requests, "hook_ms": the hook's total time,
        "logits_calls": compute_logits calls (one per engine step with verification rows)}."""
        hook = self.model_runner._hilm_verify_hook
        return {"verified": hook.verified, "hook_ms": hook.hook_s * 1e3,
                "logits_calls": hook.logits_calls}


def check_runner(runner) -> None:
    """Refuse, with the fix in the message, anything the hook was not written for."""

    check_v1_runner(runner, "verifier hook")
    if runner.speculative_config is not None:
        raise RuntimeError("hilm verifier hook: the verifier engine must run without "
                           "--speculative-config (the hook is its speculative decoding)")


@dataclass
class _Pending:
    """A request's draft rows gathered so far (chunked prefill may split them over steps)."""

    args: VerifyArgs
    # row index j -> p row [V] of the token at draft index j (j = n: the bonus token's row)
    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    raw: dict[int, torch.Tensor] = field(default_factory=dict)  # raw logits rows (emit only)
    # row index j -> (ids [c], float16 weights [c]) of its truncated p (emit only)
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # row index j -> raw logits row, before any mask (logprobs only: vLLM's raw_logprobs)
    unmasked: dict[int, torch.Tensor] = field(default_factory=dict)
    forward_s: float = 0.0
    hook_s: float = 0.0


@dataclass
class _Step:
    """One verification's part of an engine step."""

    pending: _Pending
    state: object  # the runner's CachedRequestState
    row: int  # its row in the batch
    first: int  # position of the hidden state that predicts draft token 0
    lo: int  # positions [lo, hi) of its rows computed in this step
    hi: int
    offset: int  # position -> row of the step's hidden states
    final: bool  # the request's last chunk: decide now


class _Bounded(collections.OrderedDict):
    def put(self, key, value) -> None:
        self[key] = value
        while len(self) > MAX_PENDING:
            self.popitem(last=False)


class VerifyHook:
    """Wraps `execute_model` (to time steps) and `_bookkeeping_sync` of one V1 runner."""

    def __init__(self, runner):

        memtrace.start_from_env("verifier-engine")
        self.runner = runner
        self._grammars: RowGrammars | None = None  # structured outputs' masks, once asked
        self.pending = _Bounded()  # key -> _Pending
        self.results = _Bounded()  # key -> VerifyResult
        self.verified, self.hook_s = 0, 0.0  # counters for hilm_verify_stats
        self.logits_calls = 0  # compute_logits calls (one per step with verification rows)
        self.sink = None  # channel.ResultSink: pushes each result to the API process at once
        self.keep_results = True  # False on tensor-parallel ranks other than the first
        self._step_t0 = time.perf_counter()
        self._execute_model = runner.execute_model
        self._bookkeeping_sync = runner._bookkeeping_sync
        runner.execute_model = self.execute_model
        runner._bookkeeping_sync = self.bookkeeping_sync

    @property
    def grammars(self) -> RowGrammars:
        if self._grammars is None:
            self._grammars = RowGrammars(self.runner.vllm_config)
        return self._grammars

    def pop(self, key: str) -> dict | None:
        result = self.results.pop(key, None)
        return None if result is None else result.to_dict()

    def execute_model(self, *args, **kwargs):
        self._step_t0 = time.perf_counter()
        return self._execute_model(*args, **kwargs)

    def bookkeeping_sync(self, scheduler_output, sampler_output, logits, hidden_states,
                         num_scheduled_tokens):
        """Same signature as the runner's; runs after the sampler, before the tokens are
        recorded, so an overwritten sample is what the engine emits."""
        t0 = time.perf_counter()
        steps = []
        for req_id, n_sched in scheduler_output.num_scheduled_tokens.items():
            state = self.runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            if params is not None and params.extra_args and (
                    step := self._step(req_id, state, n_sched)) is not None:
                steps.append(step)
        if steps:
            self._observe(steps, hidden_states, sampler_output, t0)
        return self._bookkeeping_sync(scheduler_output, sampler_output, logits, hidden_states,
                                      num_scheduled_tokens)

    def _step(self, req_id, state, n_sched) -> _Step | None:
        """What this step holds of one verification: which of its rows, where in the batch."""
        pending = self._pending(state)
        if pending is None:
            return None
        n, prompt_len = pending.args.n, len(state.prompt_token_ids)
        start = state.num_computed_tokens  # before this step: the runner updates it next step
        row = self.runner.input_batch.req_id_to_index[req_id]
        # Positions first .. prompt_len-2 hold the hidden states that predict draft 0 .. n-1,
        # position prompt_len-1 the one that predicts the token after them (the bonus).
        first = prompt_len - n - 1
        lo, hi = max(start, first), min(start + n_sched, prompt_len)
        offset = int(self.runner.query_start_loc.np[row]) - start  # position -> hidden row
        final = start + n_sched >= prompt_len  # else a prefill chunk: nothing sampled yet
        return _Step(pending, state, row, first, lo, max(lo, hi), offset, final)

    def _observe(self, steps: list[_Step], hidden_states, sampler_output, t0: float) -> None:
        """Every verification of the step at once: one `compute_logits` over all their rows,
        one min-tokens mask, one processed-p pass with each row's own sampling spec; then the
        accept / recover / bonus decision of each request that is complete."""
        with_rows = [st for st in steps if st.lo < st.hi]
        if with_rows:
            index = torch.cat([torch.arange(st.offset + st.lo, st.offset + st.hi)
                               for st in with_rows]).to(hidden_states.device)
            logits = self.runner.model.compute_logits(hidden_states.index_select(0, index))
            self.logits_calls += 1
            if logits is None:  # a tensor-parallel rank that does not hold gathered logits
                return
            specs, banned, contexts, at = [], [], [], 0
            for st in with_rows:
                args = st.pending.args
                specs += [args.spec] * (st.hi - st.lo)
                # the row at position a predicts token a + 1: its penalties count tokens 0..a
                # (the draft tokens before it included, as vLLM's spec decoding counts them)
                counts = args.spec.penalties is not None and args.spec.penalties.needs_context
                tokens = st.state.prompt_token_ids if counts else None
                contexts += [tokens[:a + 1] if counts else None for a in range(st.lo, st.hi)]
                # vLLM's min_tokens: the stop tokens have p = 0 in the rows before it
                ban_rows = min(st.hi - st.lo, args.ban_rows - (st.lo - st.first))
                banned += [(at + i, args.ban) for i in range(ban_rows)] if args.ban else []
                at += st.hi - st.lo
            structured = [(i, st.state.req_id, specs[i].structured, contexts_of(st, a))
                          for st, i, a in _rows_of(with_rows) if specs[i].structured is not None]
            if structured:  # vLLM masks with the grammar before its sampler (and raw logprobs)
                logits = apply_bitmask(
                    logits, torch.tensor([i for i, *_ in structured], dtype=torch.long),
                    self.grammars.bitmask([row for _, *row in structured]))
            unmasked = logits
            if banned:
                logits = ban_rows_of(logits, banned)
            probs = processed_probs_batch(logits, specs, contexts)  # [rows, V]
            at = 0
            for st in with_rows:
                k, args = st.hi - st.lo, st.pending.args
                p, raw, bare = probs[at:at + k], logits[at:at + k], unmasked[at:at + k]
                at += k
                if args.emit is not None:
                    # Emitted rows travel: verify against the truncated p, and emit exactly it.
                    p, ids, weights = truncated_probs(p, args.emit.truncation)
                for i in range(k):
                    j = st.lo - st.first + i
                    st.pending.rows[j] = p[i]
                    if args.emit is not None:
                        st.pending.raw[j] = raw[i]
                        st.pending.kept[j] = (ids[i], weights[i])
                    if args.logprobs >= 0:
                        st.pending.unmasked[j] = bare[i]
        shared = (time.perf_counter() - t0) / len(steps)  # the batched part, split evenly
        for st in steps:
            t1 = time.perf_counter()
            pending = st.pending
            if st.final:
                del self.pending[pending.args.key]
                result = self._verify(pending, st.state, st.row, sampler_output)
            now = time.perf_counter()
            pending.forward_s += now - self._step_t0
            pending.hook_s += shared + now - t1
            self.hook_s += shared + now - t1
            if st.final:
                self.verified += 1
                result = dataclasses.replace(result, forward_ms=pending.forward_s * 1e3,
                                             hook_ms=pending.hook_s * 1e3)
                # Delivered results are not kept: a store of every result would always hold
                # MAX_PENDING of them (with emitted rows, megabytes each on a real vocabulary).
                # Under tensor parallelism every rank decides (each records the token it
                # emits); only the rank that pushes keeps or sends the result.
                if self.sink is not None:
                    if not self.sink.send(result):
                        self.results.put(result.key, result)
                elif self.keep_results:
                    self.results.put(result.key, result)

    def _pending(self, state) -> _Pending | None:
        raw = state.sampling_params.extra_args.get(EXTRA_ARGS_KEY)
        if raw is None or state.num_computed_tokens >= len(state.prompt_token_ids):
            return None  # not a verification, or a decode step (none with max_tokens=1)
        if raw["key"] not in self.pending:
            self.pending.put(raw["key"], _Pending(VerifyArgs.from_extra_args(
                state.sampling_params.extra_args)))
        return self.pending[raw["key"]]

    def _verify(self, pending: _Pending, state, row: int, sampler_output) -> VerifyResult:
        """The accept / recover / bonus step on the gathered rows; the engine then emits the
        hook's token instead of its own sample."""
        args = pending.args
        if len(pending.rows) < args.n + 1:
            return VerifyResult(args.key, error=ROWS_CACHED)
        outcome = decide(pending.rows, args,
                         state.prompt_token_ids[len(state.prompt_token_ids) - args.n:])
        # [num_reqs, 1] without spec decode: the engine now emits the hook's token.
        sampler_output.sampled_token_ids[row, 0] = outcome.next_token
        result = VerifyResult(args.key, outcome.num_accepted, outcome.recovered,
                              tuple(outcome.target_probs.cpu().tolist()))
        if args.logprobs >= 0:  # the rows that decided the m accepted drafts and the next token
            m = outcome.num_accepted
            base = len(state.prompt_token_ids) - args.n
            tokens = [*state.prompt_token_ids[base:base + m], outcome.next_token]
            result = dataclasses.replace(result, logprobs=tuple(token_logprobs(
                torch.stack([pending.unmasked[j] for j in range(m + 1)]), tokens,
                args.logprobs)))
        if args.emit is None:
            return result
        return dataclasses.replace(result, emitted=self._emitted(
            pending, state, result, outcome.next_token))

    def _emitted(self, pending: _Pending, state, result: VerifyResult,
                 next_token: int) -> tuple[EmittedRow, ...]:
        """The m + 1 emitted tokens with their sparse p and u (see the module docstring).
        `next_token` is the recovered or bonus token, drawn from row m: the row shipped with
        it."""
        args, m = pending.args, result.num_accepted
        base = len(state.prompt_token_ids) - args.n  # absolute position of draft token 0
        tokens = [*state.prompt_token_ids[base:base + m], next_token]
        cfg = args.emit.uncertainty
        rows = []
        for j, token in enumerate(tokens):
            raw = pending.raw[j].float()  # u is computed where the row is (GPU on a GPU tier)
            if cfg.needs_token:
                seed = derive_seed(args.emit.noise_seed, base + j, Stream.PERTURBATION)
                u = perturbed_u(raw, token, cfg, seed)
            else:
                u = float(TOKEN_FREE_GATES[cfg.gate](raw[None, :])[0])
            ids, weights = pack_row(*(t.cpu().numpy() for t in pending.kept[j]))
            rows.append(EmittedRow(token, u, base64.b64encode(ids).decode("ascii"),
                                   base64.b64encode(weights).decode("ascii")))
        return tuple(rows)


def _rows_of(steps: list[_Step]):
    """(step, row index in the step's logits, position) of every row, in order."""
    at = 0
    for st in steps:
        for a in range(st.lo, st.hi):
            yield st, at, a
            at += 1


def contexts_of(st: _Step, a: int) -> list[int]:
    """The tokens up to and including position a of the step's request (row a predicts a + 1;
    the draft tokens before it included)."""
    return st.state.prompt_token_ids[:a + 1]


def ban_rows_of(logits: torch.Tensor, banned: list[tuple[int, tuple[int, ...]]]) -> torch.Tensor:
    """logits [N, V] with the ids of each (row, ids) set to -inf, on the logits' device; the
    input is not modified."""
    out = logits.clone()
    rows = torch.tensor([i for i, ids in banned for _ in ids], dtype=torch.long,
                        device=logits.device)
    cols = torch.tensor([t for _, ids in banned for t in ids], dtype=torch.long,
                        device=logits.device)
    out[rows, cols] = float("-inf")
    return out


def decide(rows: dict[int, torch.Tensor], args: VerifyArgs,
           draft_ids: list[int]) -> BlockOutcome:
    """The hook's decision for one request, a pure function of its n + 1 processed rows (row n:
    p_{n+1}, the bonus token's), the draft and `args`: every token the request emits after the
    accepted drafts is drawn here, from the row that is shipped with it. Draws: a CPU generator
    seeded with `args.draw_seed` (the same draws on every device and tensor-parallel rank)."""
    n = args.n
    p = torch.stack([rows[j] for j in range(n + 1)])  # [n + 1, V], on the rows' device
    draft = torch.tensor(draft_ids, dtype=torch.long)  # [n]; verify_block moves it
    generator = None if args.spec.greedy else torch.Generator().manual_seed(args.draw_seed)
    return verify_block(p[:n], draft, args.q, generator, args.spec.greedy, bonus=p[n])
