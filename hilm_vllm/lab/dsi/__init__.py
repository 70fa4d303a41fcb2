"""Distributed speculative inference (DSI, arXiv 2405.14105): cost model, wall-time replay,
heatmaps and estimation of its inputs from the zoo's tiers. CLI: `hilm dsi --help`."""

from hilm_vllm.lab.dsi.model import (Costs, dsi_cost, is_valid, min_servers, sample_accepted,
                                 si_cost, si_expected_cost, simulate)

__all__ = ["Costs", "dsi_cost", "is_valid", "min_servers", "sample_accepted", "si_cost",
           "si_expected_cost", "simulate"]
