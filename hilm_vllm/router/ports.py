"""What the router needs of a tier: its ports, as `typing.Protocol`s (in the spirit of
transformers' `CandidateGenerator`, which names the two methods a drafter must have).

`links.DrafterLink` and `links.VerifierLink` (gRPC, usage, timeouts, the network model)
implement them; so do the scripted fakes the round's tests use (tests/router/fakes.py), and
tests/router/test_ports.py checks both against these definitions. `Router(links=...)` takes a
mapping of tiers to them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from hilm_vllm.drafter.wire import DraftResult
from hilm_vllm.router.links import TierUsage, VerifyOutcome
from hilm_vllm.sampling import SamplingSpec, ScoredToken, TokenLogprob
from hilm_vllm.uncertainty import UncertaintyConfig


@runtime_checkable
class TierPort(Protocol):
    """Any tier: reachability, health, and ending sessions."""

    @property
    def available(self) -> bool:
        """False while the tier is marked down (after a lost connection)."""

    def mark_down(self, for_s: float) -> None: ...

    async def check_health(self, timeout_s: float = 2.0) -> str | None:
        """None when the tier serves, else why not."""

    async def close_session(self, sid: str, usage: TierUsage) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class DraftPort(TierPort, Protocol):
    """The drafter: a session, then one Draft per round (cut back, append, draft)."""

    async def open(self, prompt: Sequence[int], spec: SamplingSpec, max_tokens: int,
                   uncertainty: UncertaintyConfig | None, usage: TierUsage,
                   min_tokens: int = 0, stop_token_ids: Sequence[int] = (),
                   logprobs: int | None = None) -> Any: ...

    async def draft(self, sid: str, position: int, n: int, usage: TierUsage,
                    rollback_to: int | None = None,
                    append: Sequence[int] = ()) -> DraftResult: ...


@runtime_checkable
class VerifyPort(TierPort, Protocol):
    """A verifier (ILM or LLM): a session, one Verify per block, and for the LLM its own
    generation (the llm-only policy)."""

    async def open(self, prompt: Sequence[int], spec: SamplingSpec, max_tokens: int,
                   usage: TierUsage, min_tokens: int = 0,
                   stop_token_ids: Sequence[int] = ()) -> Any: ...

    async def verify(self, sid: str, position: int, append: Sequence[int],
                     block: Sequence[ScoredToken], usage: TierUsage,
                     want_emitted: bool = False, rollback_to: int | None = None,
                     logprobs: int | None = None) -> VerifyOutcome: ...

    def generate(self, prompt: Sequence[int], spec: SamplingSpec, max_tokens: int,
                 ignore_eos: bool, usage: TierUsage, stop_token_ids: Sequence[int] = (),
                 min_tokens: int = 0, stop: Sequence[str] = (),
                 penalties: Mapping | None = None, logprobs: int | None = None,
                 structured: Mapping | None = None, prompt_logprobs: int | None = None,
                 prompt_sink: list | None = None
                 ) -> AsyncIterator[tuple[list[int], str, list[TokenLogprob]]]: ...
