"""`hilm dsi {offline,online,heatmap,estimate} [--json] [key=value ...]`.

Overrides are `key=value` words in the reference implementation's style
(`hilm dsi offline c=0.05 a=0.5 k=5 N=7`). A bad key or value exits with code 2 and says on
stderr what to write instead. Heavy imports (ray, matplotlib, vllm) stay inside the handlers so
`hilm --help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from hilm_vllm.lab.dsi.config import (ConfigError, EstimateConfig, HeatmapConfig, OfflineConfig,
                                  OnlineConfig, describe, parse_overrides)
from hilm_vllm.lab.dsi.offline import format_costs, run_offline
from hilm_vllm.lab.dsi.online import run_online
from hilm_vllm.lab.dsi.heatmap import PANELS, run_heatmap
from hilm_vllm.lab.dsi.plot import plot_panels, write_report
from hilm_vllm.lab.dsi.estimate import add_predictions, measure
from hilm_vllm.zoo import ensure_zoo

_MODES = {
    "offline": (OfflineConfig, "mean cost in target forwards of non-SI, SI and DSI (simulated)"),
    "online": (OnlineConfig, "the same in wall time: threads, a forward being a sleep"),
    "heatmap": (HeatmapConfig, "best-k latency ratios over a (c, a) grid, with Ray; JSON + PNGs"),
    "estimate": (EstimateConfig, "measure a and c of the zoo's tier pairs on vLLM, predict "
                                 "SI and DSI speedups"),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dsi", help="distributed speculative inference: simulate, time, estimate",
                       description="Distributed speculative inference (arXiv 2405.14105). Time "
                                   "unit: one target forward.")
    modes = p.add_subparsers(dest="dsi_mode", metavar="MODE", required=True)
    for name, (cls, text) in _MODES.items():
        mp = modes.add_parser(name, help=text, description=text,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="keys (key=default  meaning):\n" + describe(cls))
        mp.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override a key (see the list below)")
        mp.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout and nothing else")
        if name == "heatmap":
            mp.add_argument("--address", default=None,
                            help="Ray cluster to join (e.g. ray://host:10001 or auto); default: "
                                 "start a local instance with num_cpus CPUs")
            mp.add_argument("--out", type=Path, default=None,
                            help="output directory (default: "
                                 "bench/results/dsi-heatmap-<UTC timestamp>/)")
            mp.add_argument("--no-progress", action="store_true", help="no progress bar")
        mp.set_defaults(func=_handler(name, cls))


def _handler(name: str, cls: type):
    def run(args: argparse.Namespace) -> int:
        try:
            cfg = parse_overrides(cls, args.overrides)
        except ConfigError as e:
            print(f"hilm dsi {name}: error: {e}", file=sys.stderr)
            return 2
        return _RUNNERS[name](cfg, args)

    return run


def _emit(result: dict, as_json: bool, text: str) -> None:
    print(json.dumps(result) if as_json else text, flush=True)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send fd 1 to fd 2 while libraries run: vLLM logs to stdout by default, Ray and native
    code print there too, and --json promises nothing on stdout but the object."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _header(cfg) -> str:
    return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())


def _offline(cfg: OfflineConfig, args: argparse.Namespace) -> int:

    result = run_offline(cfg)
    text = (f"DSI offline: {_header(cfg)}\n{format_costs(result, 'target forwards')}\n"
            f"SI expected (closed form): {result['si_expected']:.3f}")
    _emit(result, args.json, text)
    return 0


def _online(cfg: OnlineConfig, args: argparse.Namespace) -> int:

    result = run_online(cfg) | {"config": dataclasses.asdict(cfg)}
    units, off = result["units"], result["offline"]
    text = (f"DSI online: {_header(cfg)}\n{format_costs(result, 'wall seconds')}\n"
            f"in target forwards: " + ", ".join(
                f"{k} {units[k]:.2f} (offline, same streams: {off[k]:.2f})" for k in units)
            + f"\nDSI segments won by the target-only path: {result['dsi_target_only_wins']}"
              f" of {result['dsi_segments']}")
    _emit(result, args.json, text)
    return 0


def _heatmap(cfg: HeatmapConfig, args: argparse.Namespace) -> int:

    out = args.out or Path("bench/results") / (
        "dsi-heatmap-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    with _stdout_to_stderr():
        report = run_heatmap(cfg, args.address, progress=not args.no_progress)
        path = write_report(report, out)
        pngs = plot_panels(report, out)
    summary = {"json": str(path), "png": [str(p) for p in pngs], "ranges": report["ranges"],
               "seconds": report["seconds"], "config": report["config"]}
    lines = [f"DSI heatmap: {_header(cfg)} ({report['seconds']:.1f} s)"]
    for key, title in PANELS:
        r = report["ranges"][key]
        lines.append(f"{title:<24} {_num(r['min'])} .. {_num(r['max'])}"
                     f"  ({r['below_1']} of {r['cells']} cells below 1)")
    lines += [f"wrote {path}", *(f"wrote {p}" for p in pngs)]
    _emit(summary, args.json, "\n".join(lines))
    return 0


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _estimate(cfg: EstimateConfig, args: argparse.Namespace) -> int:

    with _stdout_to_stderr():
        models, prompts = _estimate_inputs(cfg)
        report = measure(models, prompts, cfg.tokens)
        add_predictions(report, cfg.k_max, cfg.N, cfg.S, cfg.repeats, cfg.seed)
    report["config"] = dataclasses.asdict(cfg)
    lines = [f"DSI estimate: {_header(cfg)}",
             f"{'pair':<10} {'a':>6} {'c_tpot':>7} {'c_ttft':>7} {'SI x':>6} {'k':>3}"
             f" {'DSI x':>6} {'k':>3}"]
    for name, p in report["pairs"].items():
        pr = p["prediction"]
        lines.append(f"{name:<10} {p['a']:>6.3f} {p['c_tpot']:>7.3f} {p['c_ttft']:>7.3f} "
                     f"{pr['si_speedup']:>6.2f} {pr['si_k']:>3} {_num(pr['dsi_speedup']):>6}"
                     f" {pr['dsi_k'] or '-':>3}")
    lines.append("speedups are predicted over non-SI by the offline model, c = c_tpot")
    _emit(report, args.json, "\n".join(lines))
    return 0


def _estimate_inputs(cfg: EstimateConfig) -> tuple[dict[str, Path], list]:
    """Model directories from the keys, else from the zoo (built when missing); prompts from
    the zoo's held-out set."""

    zoo = ensure_zoo(cfg.recipe)
    models = {t: Path(getattr(cfg, t)) if getattr(cfg, t) else zoo.model(t)
              for t in ("slm", "ilm", "llm")}
    return models, zoo.heldout_prompts(cfg.prompts)


_RUNNERS = {"offline": _offline, "online": _online, "heatmap": _heatmap, "estimate": _estimate}
