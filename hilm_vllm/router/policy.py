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
from pathlib import Path


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


@dataclass(frozen=True)
class Thresholds:
    """Uncertainty thresholds: u <= t1 SKIP; t1 < u <= t2 ILM; u > t2 LLM; the ILM forwards its
    own tokens with u > t_ilm. With t2 <= t1 there is no ILM band (u <= t1 SKIP, else LLM).
    `hilm calibrate` writes them in [0, 1], for the gate its YAML names (`uncertainty`); values
    set by hand outside [0, 1] are kept as they are (u never crosses them: < 0 verifies every
    token, >= 1 skips every one)."""

    t1: float = 0.0
    t2: float = 0.0
    t_ilm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("t1", "t2", "t_ilm"):
            if getattr(self, name) != getattr(self, name):
                raise ValueError(f"threshold {name} is NaN")

    @classmethod
    def from_yaml(cls, path: str | Path) -> Thresholds:
        import yaml

        data = yaml.safe_load(Path(path).read_text())
        try:
            return cls(float(data["t1"]), float(data["t2"]), float(data["t_ilm"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: expected keys t1, t2, t_ilm (written by `hilm "
                             f"calibrate`)") from e


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


@dataclass(frozen=True)
class Plan:
    skips: int  # leading tokens kept unverified
    route: Route  # where the rest of the block goes (SKIP when nothing is left)


def plan(policy: Policy, us: Sequence[float], th: Thresholds, skip_rate: float = 0.0,
         rng: random.Random | None = None) -> Plan:
    """Leading SKIPs, then the whole remaining block to the first non-skipped token's tier."""
    rng = rng or random.Random()
    for i, u in enumerate(us):
        r = route_token(policy, u, th, skip_rate, rng)
        if r is not Route.SKIP:
            return Plan(i, r)
    return Plan(len(us), Route.SKIP)


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
