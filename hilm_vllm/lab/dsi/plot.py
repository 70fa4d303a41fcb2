"""Heatmap report -> JSON file and four PNG panels (reads only the report dict)."""

from __future__ import annotations

import json
from pathlib import Path

from hilm_vllm.lab.dsi.heatmap import PANELS, panel_matrix


def write_report(report: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "heatmap.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def _centered_at_1(values):
    """Log color scale symmetric around 1 (parity): x and 1/x get mirror colors, so a 1%
    slowdown looks like a 1% speedup, not like the worst cell of the panel."""
    import numpy as np
    from matplotlib.colors import LogNorm

    finite = values[np.isfinite(values) & (values > 0)]
    span = max(float(finite.max()), 1 / float(finite.min()), 1.01) if finite.size else 2.0
    return LogNorm(vmin=1 / span, vmax=span)


def plot_panels(report: dict, out_dir: Path) -> list[Path]:
    """One PNG per panel; a dot marks each cell below 1 (the numerator is faster there)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in CI
    import matplotlib.pyplot as plt
    import numpy as np

    cs, as_ = report["grid"]["c"], report["grid"]["a"]
    paths = []
    for key, title in PANELS:
        values = panel_matrix(report, key)  # [n_a, n_c]
        fig, ax = plt.subplots(figsize=(6, 5))
        norm = _centered_at_1(values)
        mesh = ax.pcolormesh(cs, as_, values, cmap="RdYlGn_r", shading="nearest", norm=norm)
        bar = fig.colorbar(mesh, ax=ax, label="latency ratio")
        ticks = np.geomspace(norm.vmin, norm.vmax, 5)  # the middle one is 1
        bar.minorticks_off()
        bar.set_ticks(ticks, labels=[f"{t:.2g}" for t in ticks])
        below = np.argwhere(values < 1)  # [n_below, 2] (a index, c index); NaN compares False
        ax.scatter([cs[j] for _, j in below], [as_[i] for i, _ in below], s=6, c="black",
                   marker="o", label="< 1")
        ax.set(xlabel="drafter latency c (target forwards)", ylabel="acceptance rate a",
               title=f"{title}  (N={report['config']['N']}, best k per cell)")
        if len(below):
            ax.legend(loc="lower right", fontsize="small")
        path = out_dir / f"{key}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
