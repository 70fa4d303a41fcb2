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

On a Ray cluster (`--ray [ADDRESS]`, `hilm_vllm.raycluster`) each engine replica is a Ray actor
on a node that offers its tier's resource (`device`: slm, `edge`: ilm, `cloud`: llm; e.g.
`ray start --address HEAD --resources '{"cloud": 1}'`), `--{slm,ilm,llm}-replicas N` replicas
per tier, restarted by Ray when they die (`--ray-max-restarts`); the router runs here:

    hilm up --family demo --ray auto --llm-replicas 2
"""

from __future__ import annotations

import argparse
import sys
import time

from hilm_vllm import raycluster
from hilm_vllm.launch import exit_on_sigterm
from hilm_vllm.stack import Stack, family_plan

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
    g = p.add_argument_group("on a Ray cluster (needs Ray: pip install 'hilm-vllm[dsi]')")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="place each engine replica as a Ray actor on a node offering its tier's "
                        "resource (device: slm, edge: ilm, cloud: llm), the router here. ADDRESS: "
                        "the cluster's (auto, HOST:6379, ray://...); without it, the cluster "
                        "$RAY_ADDRESS or `ray start` on this machine names, else a one-node Ray "
                        "here offering every tier's resource")
    for tier in ("slm", "ilm", "llm"):
        g.add_argument(f"--{tier}-replicas", type=int, default=1, metavar="N",
                       help=f"{tier} replicas (with --ray; one unit of the "
                            f"`{raycluster.RESOURCES[tier]}` resource each; default: %(default)s)")
    g.add_argument("--ray-max-restarts", type=int, default=raycluster.DEFAULT_MAX_RESTARTS,
                   metavar="N", help="how often Ray restarts a replica that dies, on the ports "
                                     "it had (-1: without end; default: %(default)s)")


def plan(args: argparse.Namespace, router_flags: list[str]):
    """Every process's flags (`stack.StackPlan`) from `hilm up`'s arguments."""

    return family_plan(
        args.family, models={t: getattr(args, f"{t}_model") for t in TIERS},
        engine_args=args.engine_args, tier_args={t: getattr(args, f"{t}_args") for t in TIERS},
        router_flags=router_flags, no_ilm=args.no_ilm, host=args.host, port=args.port)


def run(args: argparse.Namespace, router_flags: list[str] | None = None) -> int:

    router_flags = list(router_flags or getattr(args, "unknown", []) or [])
    on_ray = getattr(args, "ray", None) is not None
    replicas = raycluster.replica_counts(args)
    if not on_ray and any(n != 1 for n in replicas.values()):
        raise SystemExit("error: --slm/--ilm/--llm-replicas need --ray (one machine: one "
                         "replica per tier)")
    stack_plan = plan(args, router_flags)
    exit_on_sigterm()
    stack = None

    def say(message: str) -> None:
        print(f"hilm up: {message}", flush=True)

    def echo(tier: str, line: str) -> None:
        print(f"[{tier}] {line}", flush=True)

    try:
        if on_ray:
            stack = raycluster.RayStack.launch(
                stack_plan, args.ray or None, replicas=replicas,
                max_restarts=args.ray_max_restarts, placement=args.placement,
                timeout=args.startup_timeout_s, echo=None if args.quiet else echo, log=say)
        else:
            stack = Stack.launch(stack_plan, placement=args.placement,
                                 timeout=args.startup_timeout_s,
                                 echo=None if args.quiet else echo, log=say)
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{host}:{stack.router.http_port}"
        say(f"ready: {url}/v1 (OpenAI API; /health, /metrics); Ctrl-C stops everything")
        print(f"HILM_URL={url}", flush=True)  # scripts read this line
        if on_ray:  # Ray restarts the replicas; this ends when a tier has none left
            while (why := stack.watch(say)) is None:
                time.sleep(5.0)
            print(f"hilm up: {why}", file=sys.stderr, flush=True)
            return 1
        while (gone := stack.exited()) is None:
            time.sleep(0.5)
        print(f"hilm up: the {gone.tier} tier exited ({gone.proc.returncode}):\n{gone.tail()}",
              file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:  # a tier that did not start (the launch stopped the others)
        print(f"hilm up: {e}", file=sys.stderr)
        return 1
    finally:
        if stack is not None:
            say("stopping")
            stack.stop()


def main(argv: list[str] | None = None, prog: str = "hilm up") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    args, unknown = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    return run(args, unknown)


if __name__ == "__main__":
    sys.exit(main())
