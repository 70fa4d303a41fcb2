"""What `hilm bench sweep` and `make demo` share: reading the newest sweep and printing its
points (the demo places its calibrated operating point among them). Apart from both, so that
neither imports the other for it."""

from __future__ import annotations

import json
from pathlib import Path

GRID_POLICIES = ("uhlm", "hilm", "rand")  # the policies a sweep draws as curves


def quality(point: dict, key: str):
    """A point's quality figure `key` (ppl_ratio, tsr, ...), None when not scored."""
    return (point.get("quality") or {}).get(key)


def latest_sweep(results_dir: str | Path, zoo: str | None = None) -> Path | None:
    """The newest bench/results/sweep-*.json (of the zoo `zoo`, when given)."""
    for path in sorted(Path(results_dir).glob("sweep-*.json"), reverse=True):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if zoo is None or doc.get("config", {}).get("zoo") == zoo:
            return path
    return None


def nearest_points(points: list[dict], tr_llm: float,
                   policies: tuple[str, ...] = GRID_POLICIES) -> list[dict]:
    """Per policy, the point whose tr_llm is nearest to `tr_llm` (and the calibrated ones)."""
    out = [p for p in points if p.get("calibrated")]
    for policy in policies:
        cands = [p for p in points if p["policy"] == policy and p.get("tr_llm") is not None
                 and not p.get("calibrated")]
        if cands:
            out.append(min(cands, key=lambda p: abs(p["tr_llm"] - tr_llm)))
    return out


def point_line(p: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    ci = ((p.get("quality") or {}).get("ci95") or {}).get("ppl_ratio")
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return (f"  {p['label']:<18} tr_llm {f(p.get('tr_llm'), '.3f')}  "
            f"tr_ilm {f(p.get('tr_ilm'), '.3f')}  skip {f(p.get('skip_rate_measured'), '.3f')}  "
            f"ppl_ratio {f(quality(p, 'ppl_ratio'), '.3f')}{ci_text}  "
            f"TSR {f(quality(p, 'tsr'), '.3f')}  "
            f"{f(p.get('tokens_per_s'), '.1f')} tok/s")
