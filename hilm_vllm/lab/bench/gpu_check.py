"""`make gpu-check`: what a GPU machine must show, in one script, with a JSON of each step.

    hilm bench gpu-check                 # on a CUDA machine: every step; elsewhere a dry run
    hilm bench gpu-check --no-install    # use the vLLM already installed (or none)

Steps, in order (each: passed / failed / skipped, seconds, the last lines of its output):
  cuda            torch sees a CUDA device (its name)
  install         vLLM's CUDA build (`vllm==0.32.0`, the pinned version) importable, installed
                  with pip if missing (a machine without network records why it failed)
  device-tests    the pure tensor functions on the real device, compared with the CPU
                  (tests/test_cuda.py), and the device-placement tests
  serve-bf16      the vocab32k family served on every tier in bfloat16 through the router:
                  T = 0 identity of spec, cascade and hlm with llm-only, the chi-square of the
                  first token for spec and cascade, hilm's routes and the uplink bytes
                  (tests/router/test_vocab32k.py with HILM_TEST_ENGINE_ARGS="--dtype bfloat16")
  vllm-bench      vLLM's serving benchmark against the router (`hilm bench vllm-serve`)
A step that needs what an earlier one could not give (CUDA, vLLM) is skipped and says so; on a
machine without CUDA the whole run is a dry run that passes. Writes
bench/results/gpu-check-<UTC>.json (config, git_commit, machine, results.steps).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from hilm_vllm import PINNED_VLLM
from hilm_vllm.lab.bench import add_common_args
from hilm_vllm.lab.benchjson import write_result

TAIL = 1500  # characters of each step's output kept in the JSON


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--no-install", action="store_true",
                   help="do not pip-install vLLM when it is missing")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per step (default: 900)")
    return p.parse_args(argv)


def run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[bool, str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        return False, f"timed out after {timeout:g} s\n{(e.stdout or '')[-TAIL:]}"
    text = (out.stdout + out.stderr)[-TAIL:]
    return out.returncode == 0, text


def vllm_version() -> str | None:
    ok, out = run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], 300)
    return out.strip().splitlines()[-1] if ok else None


def cuda_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main(argv=None) -> int:
    args = parse_args(argv)
    steps: list[dict] = []

    def step(name: str, fn) -> bool:
        t0 = time.perf_counter()
        status, detail = fn()
        steps.append({"step": name, "status": status, "seconds": round(time.perf_counter() - t0, 1),
                      "detail": detail})
        print(f"{name:<13} {status:<8} {steps[-1]['seconds']:>7.1f} s  "
              f"{detail.strip().splitlines()[-1] if detail.strip() else ''}", flush=True)
        return status == "passed"

    py = [sys.executable, "-m"]
    gpu = cuda_name()
    step("cuda", lambda: ("passed", gpu) if gpu else ("skipped", "no CUDA device: dry run"))

    def install():
        if not gpu:
            return "skipped", "needs CUDA"
        have = vllm_version()
        if have == PINNED_VLLM:
            return "passed", f"vllm {have} present"
        if args.no_install:
            return "failed", f"vllm {have or 'missing'}; --no-install given"
        ok, out = run([*py, "pip", "install", f"vllm=={PINNED_VLLM}"], args.timeout_s)
        return ("passed" if ok and vllm_version() == PINNED_VLLM else "failed"), out

    has_vllm = step("install", install)

    def device_tests():
        if not gpu:
            return "skipped", "needs CUDA"
        # the device-placement tests use vLLM's top-k/top-p kernels: only with vLLM
        files = ["tests/test_cuda.py", "tests/test_rejection.py",
                 *(["tests/test_device_placement.py"] if has_vllm else [])]
        ok, out = run([*py, "pytest", "-q", "-p", "no:cacheprovider", "-rs", *files],
                      args.timeout_s)
        return ("passed" if ok else "failed"), out

    step("device-tests", device_tests)

    def needs_vllm(fn):
        if not gpu:
            return "skipped", "needs CUDA"
        if not has_vllm:
            return "skipped", "needs vLLM (the install step failed)"
        return fn()

    def serve():
        ok, out = run([*py, "pytest", "-q", "-p", "no:cacheprovider",
                       "tests/router/test_vocab32k.py"], args.timeout_s,
                      env={"HILM_TEST_ENGINE_ARGS": "--dtype bfloat16"})
        return ("passed" if ok else "failed"), out

    step("serve-bf16", lambda: needs_vllm(serve))

    def bench():
        ok, out = run([*py, "hilm_vllm.lab.bench", "vllm-serve", "--zoo", args.zoo, "--out",
                       str(args.out)], args.timeout_s)
        return ("passed" if ok else "failed"), out

    step("vllm-bench", lambda: needs_vllm(bench))
    failed = [s["step"] for s in steps if s["status"] == "failed"]
    path = write_result("gpu-check", {"zoo": args.zoo, "install": not args.no_install,
                                      "device": gpu},
                        {"steps": steps, "passed": not failed, "dry_run": gpu is None,
                         "failed": failed}, args.out)
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
