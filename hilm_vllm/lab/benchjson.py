"""Benchmark results as JSON: config, git commit, machine, results (README.md and docs/benchmarks.md quote these)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path

RESULTS_DIR = Path("bench/results")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        import torch
        import vllm

        info |= {"torch": torch.__version__, "vllm": vllm.__version__,
                 "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    except ImportError:
        pass
    return info


def utc_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def write_result(name: str, config: dict, results: dict, out_dir: Path | None = None,
                 top: dict | None = None) -> Path:
    """Write bench/results/<name>-<UTC timestamp>.json and return its path. `top` adds keys at
    the top level (where a benchmark's issue names them, e.g. the demo's `policies`)."""
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{utc_stamp()}.json"
    doc = {"benchmark": name, "created_utc": utc_stamp(), "config": config,
           "git_commit": git_commit(), "machine": machine(), **(top or {}), "results": results}
    # Results are committed: no machine paths in them (the zoo lives in the user's cache).
    text = json.dumps(doc, indent=2, default=str).replace(str(Path.home()), "~")  # Path -> str
    path.write_text(text + "\n")
    return path
