"""The (c, a) heatmap: best lookahead per cell for SI and DSI, computed with Ray.

Grid: `ndim` drafter latencies `c` in [c_min, 1] by `ndim` acceptance rates `a` in
[a_min, a_max] (both linspace, so no cell repeats), lookaheads k = 1..ndim. For each cell, SI
takes its best k; DSI takes its best k among the *valid* ones for the fixed server budget `N`
(`N >= ceil(1 / (k*c))`), following the paper, which bounds the number of target servers
rather than letting it grow as c -> 0. A cell where no k in 1..ndim is valid has no DSI value
(null in JSON, blank in the plots); with the defaults (N = 7, ndim = 20, c_min = 0.01) every
cell has one, since k = 15 is valid at c = 0.01.

Panels are latency ratios, `numerator / denominator`: below 1 means the numerator is faster.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from hilm_vllm.lab.dsi.config import HeatmapConfig
from hilm_vllm.lab.dsi.model import is_valid, simulate

# (JSON key, panel title): each panel is a latency ratio.
PANELS = (
    ("si_over_nonsi", "SI / non-SI"),
    ("dsi_over_si", "DSI / SI"),
    ("dsi_over_nonsi", "DSI / non-SI"),
    ("dsi_over_best", "DSI / min(SI, non-SI)"),
)


def grid(cfg: HeatmapConfig) -> tuple[list[float], list[float], list[int]]:
    """c values [ndim], a values [ndim], lookaheads [ndim]."""
    cs = np.linspace(cfg.c_min, 1.0, cfg.ndim).tolist()
    as_ = np.linspace(cfg.a_min, cfg.a_max, cfg.ndim).tolist()
    return cs, as_, list(range(1, cfg.ndim + 1))


def cells(cfg: HeatmapConfig) -> Iterator[tuple[float, float]]:
    cs, as_, _ = grid(cfg)
    return ((c, a) for a in as_ for c in cs)


def best_cell(c: float, a: float, ks: list[int], n_servers: int, S: int, repeats: int,
              seed: int) -> dict:
    """The best k for SI and for DSI (valid k only) in one cell, with the latency ratios."""
    best_si, best_dsi = (math.inf, 0), (math.inf, 0)
    for k in ks:
        means = simulate(c, a, k, S, repeats, seed).means()
        best_si = min(best_si, (means["si"], k))
        if is_valid(c, k, n_servers):
            best_dsi = min(best_dsi, (means["dsi"], k))
    si, nonsi = best_si[0], float(S)
    row = {"c": c, "a": a, "nonsi": nonsi, "si": si, "k_si": best_si[1],
           "si_over_nonsi": si / nonsi, "dsi": None, "k_dsi": None,
           "dsi_over_si": None, "dsi_over_nonsi": None, "dsi_over_best": None}
    if best_dsi[1]:  # some k is valid for N servers
        dsi = best_dsi[0]
        row |= {"dsi": dsi, "k_dsi": best_dsi[1], "dsi_over_si": dsi / si,
                "dsi_over_nonsi": dsi / nonsi, "dsi_over_best": dsi / min(si, nonsi)}
    return row


def compute(cfg: HeatmapConfig, address: str | None = None, progress: bool = True) -> list[dict]:
    """Every cell, one Ray task each, in grid order (a major, c minor).

    Starts a local Ray instance (or joins `address`) unless one is already up, and shuts down
    only what it started."""
    import ray
    from tqdm import tqdm

    owns = not ray.is_initialized()
    if owns:
        # Workers' stdout would land on ours and break --json; errors still come back as
        # exceptions from ray.get.
        kwargs = {"address": address} if address else {"num_cpus": cfg.num_cpus,
                                                         "include_dashboard": False}
        ray.init(log_to_driver=False, **kwargs)
    try:
        task = ray.remote(num_cpus=1)(best_cell)
        _, _, ks = grid(cfg)
        refs = [task.remote(c, a, ks, cfg.N, cfg.S, cfg.repeats, cfg.seed) for c, a in cells(cfg)]
        order = {ref: i for i, ref in enumerate(refs)}
        out: list[dict | None] = [None] * len(refs)
        pending = list(refs)
        with tqdm(total=len(refs), desc="cells", unit="cell", disable=not progress,
                  file=sys.stderr) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=min(len(pending), 8), timeout=1.0)
                for ref in done:
                    out[order[ref]] = ray.get(ref)
                bar.update(len(done))
        return out  # type: ignore[return-value]
    finally:
        if owns:
            ray.shutdown()


def ranges(results: list[dict]) -> dict[str, dict]:
    """Per panel: min, max, and how many cells are below 1 (numerator faster)."""
    out = {}
    for key, _ in PANELS:
        vals = np.array([r[key] for r in results if r[key] is not None], dtype=float)
        out[key] = {"min": float(vals.min()) if vals.size else None,
                    "max": float(vals.max()) if vals.size else None,
                    "below_1": int((vals < 1).sum()), "cells": int(vals.size)}
    return out


def git_commit() -> str | None:
    """HEAD of the repository this code runs from, or None outside git (or before a commit)."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}


def run_heatmap(cfg: HeatmapConfig, address: str | None = None, progress: bool = True) -> dict:
    start = time.perf_counter()
    results = compute(cfg, address, progress)
    cs, as_, ks = grid(cfg)
    return {"config": dataclasses.asdict(cfg) | {"address": address},
            "grid": {"c": cs, "a": as_, "k": ks}, "git_commit": git_commit(),
            "machine": machine(), "seconds": time.perf_counter() - start,
            "ranges": ranges(results), "results": results}


def panel_matrix(report: dict, key: str) -> np.ndarray:
    """[n_a, n_c] values of one panel (NaN where DSI has no valid k)."""
    n_a, n_c = len(report["grid"]["a"]), len(report["grid"]["c"])
    vals = [np.nan if r[key] is None else r[key] for r in report["results"]]
    return np.array(vals, dtype=float).reshape(n_a, n_c)
