"""Command-line flags that more than one tier takes (next to vLLM's engine flags)."""

from __future__ import annotations

import argparse
import dataclasses

from hilm_vllm.sampling import Truncation
from hilm_vllm.server.caps import DEFAULT_MAX_CLIENT_SAMPLES
from hilm_vllm.uncertainty import MAX_SAMPLES, Gate, Perturbation, UncertaintyConfig

def add_session_args(group: argparse._ArgumentGroup, settings) -> None:
    """--max-sessions, --max-sessions-per-client, --session-ttl-s: the session store of the
    drafter and verifier tiers (`settings` holds their defaults)."""
    group.add_argument("--max-sessions", type=int, default=settings.max_sessions,
                       help="open sessions at most; OpenSession beyond it is RESOURCE_EXHAUSTED "
                            "(default: %(default)s)")
    group.add_argument("--max-sessions-per-client", type=int,
                       default=settings.max_sessions_per_client,
                       help="open sessions one client may hold (its certificate's identity "
                            "under mutual TLS, else its client id); OpenSession beyond it is "
                            "RESOURCE_EXHAUSTED (default: %(default)s)")
    group.add_argument("--exempt-principals", type=lambda v: tuple(x for x in v.split(",") if x),
                       default=settings.exempt_principals, metavar="NAME,...",
                       help="principals --max-sessions-per-client does not limit (only "
                            "--max-sessions does): the router, which serves many users and "
                            "queues them fairly itself. A name matches a principal exactly or as "
                            "NAME-...; without mutual TLS a principal is only the client id a "
                            "caller names, so the per-client cap binds well-behaved clients "
                            "only; under mutual TLS name the router's certificate as x509:<CN>. "
                            "Empty: no exemption (default: %(default)s)")
    group.add_argument("--session-ttl-s", type=float, default=settings.session_ttl_s,
                       help="a session unused this long expires (default: %(default)s)")


def add_uncertainty_args(group: argparse._ArgumentGroup, default: UncertaintyConfig,
                         gate_help: str) -> None:
    """--uncertainty-gate, --uncertainty-samples, --theta-max, --perturbation."""
    group.add_argument("--uncertainty-gate", choices=[x.value for x in Gate],
                       default=default.gate.value, help=f"{gate_help} (default: %(default)s)")
    group.add_argument("--uncertainty-samples", type=int, default=default.num_samples,
                       help="K, perturbed samples per token (default: %(default)s)")
    group.add_argument("--max-uncertainty-samples", type=int, default=DEFAULT_MAX_CLIENT_SAMPLES,
                       help=f"largest K a client may ask for (UncertaintyConfig.num_samples); "
                            f"K costs K x vocab random draws per token, so a client-chosen 1024 "
                            f"is a denial of service (default: %(default)s, at most {MAX_SAMPLES})")
    group.add_argument("--theta-max", type=float, default=default.theta_max,
                       help="largest perturbation temperature (default: %(default)s)")
    group.add_argument("--perturbation", choices=[x.value for x in Perturbation],
                       default=default.perturbation.value,
                       help="uniform: theta ~ U(0, theta_max] per token (U-HLM); grid: "
                            "theta_max*k/K (HiLM without theta = 0) (default: %(default)s)")


def uncertainty_from_args(args: argparse.Namespace, default: UncertaintyConfig
                          ) -> UncertaintyConfig:
    """The flags above as a config; a namespace built without them keeps `default`.
    Raises ValueError for values the config refuses."""
    return UncertaintyConfig(
        Gate(getattr(args, "uncertainty_gate", default.gate.value)),
        getattr(args, "uncertainty_samples", default.num_samples),
        getattr(args, "theta_max", default.theta_max),
        Perturbation(getattr(args, "perturbation", default.perturbation.value)))


def add_truncation_args(group: argparse._ArgumentGroup, prefix: str, default: Truncation,
                        what: str) -> None:
    """`--{prefix}-top-k N` and `--{prefix}-eps EPS`: a `sampling.Truncation` of `what` (the
    drafter's proposal, a verifier's emitted rows), declared once for both tiers."""
    group.add_argument(f"--{prefix}-top-k", type=int, default=default.cap, metavar="N",
                       help=f"{what} holds at most N tokens (after the request's own "
                            f"top-k/top-p), renormalised, float16 weights (6 bytes an entry): "
                            f"the token is an exact sample of exactly that law, so a tier that "
                            f"verifies it stays exact whatever N is. 0 = no cap "
                            f"(default: %(default)s)")
    group.add_argument(f"--{prefix}-eps", type=float, default=default.eps, metavar="EPS",
                       help=f"with --{prefix}-top-k: drop the least likely tokens holding at "
                            f"most EPS of the mass (the smallest set holding >= 1 - EPS is "
                            f"kept); 0 = keep every token with probability > 0 "
                            f"(default: %(default)s)")


def truncation_from_args(args: argparse.Namespace, prefix: str, default: Truncation
                         ) -> Truncation:
    """The Truncation of `add_truncation_args`; namespaces without the flags keep `default`.
    ValueError on a bad value."""
    key = prefix.replace("-", "_")
    return Truncation(getattr(args, f"{key}_top_k", default.cap),
                      getattr(args, f"{key}_eps", default.eps))


def add_field_flags(group: argparse._ArgumentGroup, defaults, helps: dict[str, str]) -> None:
    """One `--field-name` int flag per entry of `helps` (a field of the dataclass instance
    `defaults`, whose value is the flag's default); " (default: N)" is appended to each help."""
    for name, text in helps.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=int,
                           default=getattr(defaults, name), help=f"{text} (default: %(default)s)")


def fields_from_args(cls, args: argparse.Namespace):
    """The dataclass `cls` from the flags `add_field_flags` declared (a namespace built without
    them keeps the defaults); its own checks raise ValueError naming the flag."""
    defaults = cls()
    return cls(**{f.name: getattr(args, f.name, getattr(defaults, f.name))
                  for f in dataclasses.fields(cls)})
