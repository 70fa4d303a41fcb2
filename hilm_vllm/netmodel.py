"""The network model: what a message between two sites costs (pure functions, no I/O).

Each hop between two sites has a one-way latency and a rate `W * log2(1 + SNR)` (Shannon, with
W the bandwidth in Hz and SNR linear); a message of `nbytes` serialized bytes takes

    delay = latency + 8 * nbytes / rate

It is charged once per hop and direction. In hilm-vllm the router (on the device) sends every
message and receives every reply, so it applies both: the request's delay before sending it, the
reply's after receiving it, each computed from the real serialized size. With no bandwidth given
the rate is unlimited and only the latency counts. The preset `hilm` is the HiLM seed's:
device<->edge 10 ms, device<->cloud 60 ms, edge<->cloud 50 ms.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class Site(str, enum.Enum):
    DEVICE = "device"  # the SLM and the router
    EDGE = "edge"  # the ILM
    CLOUD = "cloud"  # the LLM


PRESETS: dict[str, dict[frozenset, float]] = {
    "none": {},
    "hilm": {frozenset({Site.DEVICE, Site.EDGE}): 0.010,
             frozenset({Site.DEVICE, Site.CLOUD}): 0.060,
             frozenset({Site.EDGE, Site.CLOUD}): 0.050},
}


def shannon_rate(bandwidth_hz: float, snr_db: float) -> float:
    """Bits per second of a channel of `bandwidth_hz` at `snr_db`: W log2(1 + 10^(SNR/10))."""
    if bandwidth_hz <= 0:
        raise ValueError(f"bandwidth must be > 0 Hz, got {bandwidth_hz}")
    return bandwidth_hz * math.log2(1.0 + 10.0 ** (snr_db / 10.0))


@dataclass(frozen=True)
class Hop:
    latency_s: float = 0.0
    rate_bps: float = math.inf

    def delay(self, nbytes: int) -> float:
        """Seconds for one message of `nbytes` serialized bytes over this hop."""
        return self.latency_s + (8.0 * nbytes / self.rate_bps if nbytes > 0 else 0.0)


@dataclass(frozen=True)
class NetworkModel:
    """Latency per pair of sites and one rate for every hop. Off (all zero) by default."""

    latencies: dict[frozenset, float] = field(default_factory=dict)
    rate_bps: float = math.inf
    preset: str = "none"

    @property
    def enabled(self) -> bool:
        return bool(self.latencies) or math.isfinite(self.rate_bps)

    def hop(self, a: Site, b: Site) -> Hop:
        if a == b:
            return Hop()  # same machine: loopback, no simulated cost
        return Hop(self.latencies.get(frozenset({a, b}), 0.0), self.rate_bps)

    def delay(self, a: Site, b: Site, nbytes: int) -> float:
        return self.hop(a, b).delay(nbytes)

    def describe(self) -> dict:
        return {"preset": self.preset,
                "latency_ms": {"-".join(sorted(s.value for s in k)): v * 1e3
                               for k, v in self.latencies.items()},
                "rate_bps": None if math.isinf(self.rate_bps) else self.rate_bps}


def network_model(preset: str = "none", bandwidth_hz: float | None = None,
                  snr_db: float = 20.0) -> NetworkModel:
    """`--latency {none,hilm}`, `--bandwidth HZ`, `--snr-db DB` -> a model."""
    if preset not in PRESETS:
        raise ValueError(f"unknown latency preset {preset!r}; choose from {sorted(PRESETS)}")
    rate = math.inf if bandwidth_hz is None else shannon_rate(bandwidth_hz, snr_db)
    return NetworkModel(dict(PRESETS[preset]), rate, preset)
