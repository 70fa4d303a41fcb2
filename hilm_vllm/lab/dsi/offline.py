"""Offline DSI: mean costs in target forwards, from the pure model."""

from __future__ import annotations

import dataclasses

from hilm_vllm.lab.dsi.config import OfflineConfig
from hilm_vllm.lab.dsi.model import si_expected_cost, simulate


def run_offline(cfg: OfflineConfig) -> dict:
    """`{"nonsi", "si", "dsi", "speedup_*", "si_expected", "config"}`; costs in target forwards."""
    costs = simulate(cfg.c, cfg.a, cfg.k, cfg.S, cfg.repeats, cfg.seed)
    return {**costs.means(), "si_expected": si_expected_cost(cfg.S, cfg.k, cfg.c, cfg.a),
            "config": dataclasses.asdict(cfg)}


def format_costs(result: dict, unit: str) -> str:
    """A small table: one row per algorithm, with DSI's speedup over it."""
    lines = [f"{'algorithm':<10} {'cost (' + unit + ')':>24} {'DSI speedup':>12}"]
    for name, key in (("non-SI", "nonsi"), ("SI", "si"), ("DSI", "dsi")):
        lines.append(f"{name:<10} {result[key]:>24.3f} {result[key] / result['dsi']:>11.3f}x")
    return "\n".join(lines)
