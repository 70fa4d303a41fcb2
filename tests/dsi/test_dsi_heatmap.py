"""The heatmap: grid bookkeeping, best-k choice, Ray run, report and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hilm_vllm.lab.dsi.config import HeatmapConfig
from hilm_vllm.lab.dsi.heatmap import PANELS, best_cell, cells, grid, panel_matrix, run_heatmap
from hilm_vllm.lab.dsi.model import is_valid, simulate


@pytest.mark.parametrize("ndim", [2, 5, 20])
def test_grid_counts_and_no_duplicates(ndim):
    cfg = HeatmapConfig(ndim=ndim)
    cs, as_, ks = grid(cfg)
    pairs = list(cells(cfg))
    assert len(pairs) == ndim * ndim == len(set(pairs))
    assert len(set(cs)) == len(set(as_)) == ndim and ks == list(range(1, ndim + 1))
    assert cs[0] == cfg.c_min and cs[-1] == 1.0 and as_[0] == cfg.a_min and as_[-1] == cfg.a_max


def test_best_cell_takes_the_best_valid_k():
    c, a, ks, n = 0.05, 0.8, [1, 2, 3, 4, 5, 6], 7
    row = best_cell(c, a, ks, n, 300, 3, 1)
    si = {k: simulate(c, a, k, 300, 3, 1).si.mean() for k in ks}
    dsi = {k: simulate(c, a, k, 300, 3, 1).dsi.mean() for k in ks if is_valid(c, k, n)}
    assert set(dsi) == {3, 4, 5, 6}  # k = 1, 2 would need 20 and 10 servers
    assert row["k_si"] == min(si, key=si.get) and row["si"] == si[row["k_si"]]
    assert row["k_dsi"] == min(dsi, key=dsi.get) and row["dsi"] == dsi[row["k_dsi"]]
    assert row["dsi_over_best"] == pytest.approx(row["dsi"] / min(row["si"], 300))


def test_a_cell_without_a_valid_k_has_no_dsi():
    row = best_cell(0.01, 0.5, [1, 2], 7, 100, 2, 0)
    assert row["dsi"] is None and row["dsi_over_si"] is None and row["si"] > 0


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def report(local_ray):
    return run_heatmap(HeatmapConfig(ndim=4, S=200, repeats=2), progress=False)


def test_ray_run_covers_every_cell_once_in_order(report):
    cfg = HeatmapConfig(ndim=4, S=200, repeats=2)
    got = [(r["c"], r["a"]) for r in report["results"]]
    assert got == list(cells(cfg))
    assert report["config"]["ndim"] == 4 and report["grid"]["k"] == [1, 2, 3, 4]
    # Ray computed the same numbers as a local call.
    r = report["results"][5]
    assert r == best_cell(r["c"], r["a"], [1, 2, 3, 4], 7, 200, 2, 42)


def test_report_has_provenance_and_ranges(report):
    assert report["git_commit"] is None or len(report["git_commit"]) == 40
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["platform"]
    for key, _ in PANELS:
        vals = panel_matrix(report, key)
        assert vals.shape == (4, 4)
        assert report["ranges"][key]["min"] == pytest.approx(np.nanmin(vals))
    # DSI is never slower than SI nor non-SI where it has a valid k.
    assert report["ranges"]["dsi_over_best"]["max"] <= 1.0 + 1e-9
    json.dumps(report)  # serializable as is


def test_plots_and_json_are_written(report, tmp_path):
    from hilm_vllm.lab.dsi.plot import plot_panels, write_report

    path = write_report(report, tmp_path / "out")
    assert json.loads(path.read_text())["results"] == report["results"]
    pngs = plot_panels(report, tmp_path / "out")
    assert [p.name for p in pngs] == [f"{key}.png" for key, _ in PANELS]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
