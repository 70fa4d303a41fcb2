"""The verifier tier's worker extension (`--worker-extension-cls`): the verification hook's
RPCs plus the engine busy-time timer (`hilm_vllm.server.busy`)."""

from __future__ import annotations

from hilm_vllm.server.busy import BusyWorkerExtension
from hilm_vllm.verifier.worker import VerifierWorkerExtension


class VerifierTierExtension(VerifierWorkerExtension, BusyWorkerExtension):
    pass
