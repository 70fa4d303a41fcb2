"""The tiers, as a type: what `hilm-serve --tier` serves, each model tier's site in the network
model, and the name used as its metric label and `usage.hilm` key."""

from __future__ import annotations

import enum

from hilm_vllm.netmodel import Site


class Tier(str, enum.Enum):
    LLM = "llm"  # data center: Verifier + Generator on the large model
    ILM = "ilm"  # edge server: Verifier on the intermediate model, offloads to the LLM
    SLM = "slm"  # device: Drafter with same-step uncertainty
    ROUTER = "router"  # device: the policy loop; no model

    @property
    def runs_engine(self) -> bool:
        return self is not Tier.ROUTER

    @property
    def site(self) -> Site:
        return Site.CLOUD if self is Tier.LLM else Site.EDGE if self is Tier.ILM else Site.DEVICE


MODEL_TIERS = (Tier.SLM, Tier.ILM, Tier.LLM)  # the tiers that run a model, device to cloud
