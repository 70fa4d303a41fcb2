"""The policy's uncertainty thresholds: a value type shared by the router, the codec that reads
their YAML and calibration (apart from the router so that those need not import it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    """Uncertainty thresholds: u <= t1 SKIP; t1 < u <= t2 ILM; u > t2 LLM; the ILM forwards its
    own tokens with u > t_ilm. With t2 <= t1 there is no ILM band (u <= t1 SKIP, else LLM).
    `hilm calibrate` writes them in [0, 1] (`codec.read_thresholds` reads its YAML), for the
    gate the YAML names (`uncertainty`); values
    set by hand outside [0, 1] are kept as they are (u never crosses them: < 0 verifies every
    token, >= 1 skips every one)."""

    t1: float = 0.0
    t2: float = 0.0
    t_ilm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("t1", "t2", "t_ilm"):
            if getattr(self, name) != getattr(self, name):
                raise ValueError(f"threshold {name} is NaN")
