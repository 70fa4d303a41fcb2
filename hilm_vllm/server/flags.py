"""Command-line flags that more than one tier takes (next to vLLM's engine flags)."""

from __future__ import annotations

import argparse

from hilm_vllm.uncertainty import Gate, Perturbation, UncertaintyConfig


def add_uncertainty_args(group: argparse._ArgumentGroup, default: UncertaintyConfig,
                         gate_help: str) -> None:
    """--uncertainty-gate, --uncertainty-samples, --theta-max, --perturbation."""
    group.add_argument("--uncertainty-gate", choices=[x.value for x in Gate],
                       default=default.gate.value, help=f"{gate_help} (default: %(default)s)")
    group.add_argument("--uncertainty-samples", type=int, default=default.num_samples,
                       help="K, perturbed samples per token (default: %(default)s)")
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
