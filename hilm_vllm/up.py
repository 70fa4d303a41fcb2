"""`hilm up`: the whole system in one command: the slm, ilm and llm tiers and the router.

    hilm up --family demo                       # the demo family (zoo:demo/{slm,ilm,llm})
    hilm up --slm-model M1 --ilm-model M2 --llm-model M3 --policy spec
    hilm up --family demo --policy cascade --api-key KEY     # other flags go to the router

Engine tiers are placed on this machine's cores as co-located tiers
(`hilm_vllm.server.engine_env.placement`, `--placement`), the command waits until every tier is
healthy, prints the router's URL, and stops everything on Ctrl-C or SIGTERM (and when a tier
exits by itself, after printing its last lines). Flags it does not know are the router's
(`hilm-serve --tier router --help`); `--engine-args` (every engine tier) and
`--{slm,ilm,llm}-args` (one tier) pass vLLM engine flags, e.g. `--llm-args "--max-model-len 4096"`.
With `--family F`, `engine_configs/F-<tier>.yaml` and `engine_configs/thresholds-F.yaml` are
used when they exist (in the current directory or the source checkout).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

TIERS = ("llm", "ilm", "slm")  # started in this order; stopped in reverse


def add_parser(sub) -> None:
    p = sub.add_parser("up", help="start slm, ilm, llm and the router, print the URL, stop all "
                                  "on Ctrl-C", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(func=run, accepts_unknown=True)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default=None,
                   help="a model family of the zoo (zoo:F/slm, zoo:F/ilm, zoo:F/llm), e.g. demo")
    for tier in ("slm", "ilm", "llm"):
        p.add_argument(f"--{tier}-model", default=None, metavar="MODEL",
                       help=f"the {tier} tier's model: a Hugging Face name or directory, or "
                            f"zoo:<family>/{tier} (default: --family's)")
        p.add_argument(f"--{tier}-args", default="", metavar="FLAGS",
                       help=f"more vLLM engine flags of the {tier} tier (one quoted string)")
    p.add_argument("--engine-args", default="", metavar="FLAGS",
                   help="vLLM engine flags of every engine tier (one quoted string)")
    p.add_argument("--no-ilm", action="store_true",
                   help="two tiers only (slm, llm): policies spec, uhlm, hlm, rand, llm-only")
    p.add_argument("--host", default="127.0.0.1", help="address of the router's HTTP API "
                                                         "(default: %(default)s)")
    p.add_argument("--port", type=int, default=8000,
                   help="the router's HTTP port (OpenAI API, /metrics) (default: %(default)s)")
    p.add_argument("--placement", default=None,
                   help="how the engine tiers share the cores (spread, device-alone, vllm, "
                        "nobind; default: $HILM_PLACEMENT, else spread)")
    p.add_argument("--startup-timeout-s", type=float, default=900.0,
                   help="how long to wait for every tier to turn healthy (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="do not echo the router's log")


def _find_config(name: str) -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        path = base / "engine_configs" / name
        if path.is_file():
            return path
    return None


def plan(args: argparse.Namespace, router_flags: list[str]) -> dict[str, list[str]]:
    """The hilm-serve arguments of each process (tier -> argv after `--tier TIER`)."""
    from hilm_vllm.serve import resolve_model

    tiers = [t for t in TIERS if not (args.no_ilm and t == "ilm")]
    out: dict[str, list[str]] = {}
    for tier in tiers:
        model = getattr(args, f"{tier}_model") or (
            f"zoo:{args.family}/{tier}" if args.family else None)
        if model is None:
            raise SystemExit(f"error: give --{tier}-model, or --family (e.g. --family demo)")
        resolve_model(model)  # fails now, with how to build it, if the zoo is missing
        argv = ["--model", model, "--port", "0", "--metrics-port", "0"]
        config = _find_config(f"{args.family}-{tier}.yaml") if args.family else None
        if config is not None:
            argv += ["--config", str(config)]
        argv += shlex.split(args.engine_args) + shlex.split(getattr(args, f"{tier}_args"))
        out[tier] = argv
    router = ["--model", out["llm"][1], "--host", args.host, "--port", str(args.port),
              "--grpc-port", "0", "--metrics-port", "0"]
    if args.family and "--thresholds" not in router_flags and not any(
            f in router_flags for f in ("--t1", "--t2")):
        th = _find_config(f"thresholds-{args.family}.yaml")
        if th is not None:
            router += ["--thresholds", str(th)]
    if args.no_ilm and "--policy" not in router_flags:
        router += ["--policy", "spec"]
    out["router"] = router + list(router_flags)
    return out


def run(args: argparse.Namespace, router_flags: list[str] | None = None) -> int:
    from hilm_vllm.launch import TierProcess, exit_on_sigterm

    router_flags = list(router_flags or getattr(args, "unknown", []) or [])
    argvs = plan(args, router_flags)
    exit_on_sigterm()
    procs: list[TierProcess] = []

    def echo(tier):
        return None if args.quiet else (lambda line: print(f"[{tier}] {line}", flush=True))

    try:
        engines = [t for t in TIERS if t in argvs]
        print(f"hilm up: starting {', '.join(engines)} ...", flush=True)
        for tier in engines:
            procs.append(TierProcess.start(tier, argvs[tier], placement=args.placement))
        for p in procs:
            p.wait_healthy(args.startup_timeout_s)
            print(f"hilm up: {p.tier} ready at {p.grpc_address} "
                  f"(metrics {p.metrics_url})", flush=True)
        addr = {p.tier: p.grpc_address for p in procs}
        router = argvs["router"] + ["--llm", addr["llm"], "--slm", addr["slm"]]
        if "ilm" in addr:
            router += ["--ilm", addr["ilm"]]
        r = TierProcess.start("router", router, echo=echo("router"))
        procs.append(r)
        r.wait_healthy(args.startup_timeout_s)
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{host}:{r.http_port}"
        print(f"hilm up: ready: {url}/v1 (OpenAI API; /health, /metrics); Ctrl-C stops "
              f"everything", flush=True)
        print(f"HILM_URL={url}", flush=True)  # scripts read this line
        while True:
            for p in procs:
                if p.proc.poll() is not None:
                    print(f"hilm up: the {p.tier} tier exited ({p.proc.returncode}):\n"
                          f"{p.tail()}", file=sys.stderr, flush=True)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:  # a tier that did not start
        print(f"hilm up: {e}", file=sys.stderr)
        return 1
    finally:
        print("hilm up: stopping", flush=True)
        for p in reversed(procs):
            p.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hilm up", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    args, unknown = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    return run(args, unknown)


if __name__ == "__main__":
    sys.exit(main())
