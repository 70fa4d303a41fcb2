"""Routing policies and thresholds: which tier verifies which drafted token (pure, no I/O).

A round drafts a block of k tokens x_0..x_{k-1} with uncertainties u_0..u_{k-1}. `plan` splits it
into a prefix of SKIPs (kept on the device, unverified) and the rest, which goes as one block to
the tier the first non-skipped token is routed to:

| policy | per token | lossless |
| --- | --- | --- |
| `llm-only` | no drafter: the LLM generates (its own `Generate` stream) | yes |
| `hlm` | k = 1, every token to the LLM, one per round trip (U-HLM's baseline) | yes |
| `spec` | blocks of k, all to the LLM | yes |
| `uhlm` | u <= T2: SKIP, else LLM (two tiers, U-HLM) | no |
| `hilm` | u <= T1: SKIP; T1 < u <= T2: ILM; u > T2: LLM; the ILM's own u > T_ilm -> LLM | no |
| `cascade` | all to the ILM; the ILM-exact tokens are the LLM's draft | yes |
| `rand` | SKIP with probability `skip_rate`, else LLM (U-HLM's Rand-HLM) | no |
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass

from hilm_vllm.thresholds import Thresholds
from hilm_vllm.tiers import Tier


class Policy(str, enum.Enum):
    LLM_ONLY = "llm-only"
    HLM = "hlm"
    SPEC = "spec"
    UHLM = "uhlm"
    HILM = "hilm"
    CASCADE = "cascade"
    RAND = "rand"

    @property
    def lossless(self) -> bool:
        return self in (Policy.LLM_ONLY, Policy.HLM, Policy.SPEC, Policy.CASCADE)

    @property
    def uses_drafter(self) -> bool:
        return self is not Policy.LLM_ONLY

    @property
    def uses_ilm(self) -> bool:
        return self in (Policy.HILM, Policy.CASCADE)

    @classmethod
    def parse(cls, name: str) -> Policy:
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown policy {name!r}; choose one of "
                             f"{', '.join(p.value for p in cls)}") from None


class Route(str, enum.Enum):
    SKIP = "skip"
    ILM = "ilm"
    LLM = "llm"


def route_token(policy: Policy, u: float, th: Thresholds, skip_rate: float,
                rng: random.Random) -> Route:
    """Where one drafted token goes under `policy`."""
    if policy in (Policy.HLM, Policy.SPEC, Policy.LLM_ONLY):
        return Route.LLM
    if policy is Policy.CASCADE:
        return Route.ILM
    if policy is Policy.UHLM:
        return Route.SKIP if u <= th.t2 else Route.LLM
    if policy is Policy.RAND:
        return Route.SKIP if rng.random() < skip_rate else Route.LLM
    if u <= th.t1:
        return Route.SKIP
    return Route.ILM if u <= th.t2 else Route.LLM


class Forward(str, enum.Enum):
    """Which of the ILM's emitted tokens go on to the LLM (as its draft, q = the ILM's p)."""

    NONE = "none"  # none: the ILM's tokens are final (it is not asked for its distributions)
    UNSURE = "unsure"  # from the first one whose own u exceeds t_ilm (hilm)
    ALL = "all"  # all of them (cascade: the ILM-exact tokens are the LLM's draft)


class LlmDown(str, enum.Enum):
    """What an LLM that does not answer means for the policy."""

    FAIL = "fail"  # lossless: the request ends with 503 (tokens already streamed stay)
    KEEP = "keep"  # lossy: the ILM's (else the drafter's) tokens stand, marked `degraded`


@dataclass(frozen=True)
class RoundPlan:
    """What one round does with a drafted block: keep `skips` leading tokens unverified, send
    the rest to `target` (None when nothing is left); how the ILM's result is forwarded; what
    an unreachable LLM means. An unreachable ILM always sends its block to the LLM instead."""

    skips: int
    target: Tier | None
    forward: Forward = Forward.NONE
    llm_down: LlmDown = LlmDown.FAIL
    t_ilm: float = 0.0

    @property
    def want_emitted(self) -> bool:
        """Ask the ILM for its emitted tokens' distributions and u (needed to forward)."""
        return self.target is Tier.ILM and self.forward is not Forward.NONE

    def forward_from(self, emitted_us: Sequence[float]) -> int | None:
        """Index of the first ILM-emitted token that goes on to the LLM, None if none does."""
        if self.forward is Forward.ALL:
            return 0 if emitted_us else None
        if self.forward is Forward.UNSURE:
            return ilm_forward_from(emitted_us, self.t_ilm)
        return None


_FORWARD = {Policy.HILM: Forward.UNSURE, Policy.CASCADE: Forward.ALL}
_TIER = {Route.ILM: Tier.ILM, Route.LLM: Tier.LLM, Route.SKIP: None}


def forward_rule(policy: Policy) -> Forward:
    """How `policy` forwards the ILM's tokens to the LLM."""
    return _FORWARD.get(policy, Forward.NONE)


def plan(policy: Policy, us: Sequence[float], th: Thresholds, skip_rate: float = 0.0,
         rng: random.Random | None = None) -> RoundPlan:
    """Leading SKIPs, then the whole remaining block to the first non-skipped token's tier."""
    rng = rng or random.Random()
    skips, route = len(us), Route.SKIP
    for i, u in enumerate(us):
        r = route_token(policy, u, th, skip_rate, rng)
        if r is not Route.SKIP:
            skips, route = i, r
            break
    return RoundPlan(skips, _TIER[route], forward_rule(policy),
                     LlmDown.FAIL if policy.lossless else LlmDown.KEEP, th.t_ilm)


def ilm_forward_from(us: Sequence[float], t_ilm: float) -> int | None:
    """Index of the first ILM-emitted token whose own uncertainty exceeds t_ilm (that token and
    the rest of the ILM's block go to the LLM), or None when the ILM's result is final."""
    for i, u in enumerate(us):
        if u > t_ilm:
            return i
    return None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
