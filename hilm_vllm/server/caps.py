"""The session and sampling caps the tiers' cores enforce, and their defaults (the flags that set
them are in flags.py; the cores need the values, not the command line)."""

from __future__ import annotations

from hilm_vllm.errors import InvalidArgument
from hilm_vllm.uncertainty import MAX_SAMPLES

# The largest K a client may ask for: each sample costs a [vocab] float64 row of work per token.
DEFAULT_MAX_CLIENT_SAMPLES = 64
# One client may hold this many of a tier's sessions (--max-sessions-per-client).
DEFAULT_MAX_SESSIONS_PER_CLIENT = 128
# Principals the per-client cap does not count (--exempt-principals): the router, which opens
# the sessions of all its users and admits them fairly itself (router/admission.py). Its client
# id is "hilm-router-<pid>"; a principal matches a name exactly or as "<name>-...".
DEFAULT_EXEMPT_PRINCIPALS = ("hilm-router",)


def check_client_samples(num_samples: int, cap: int, field: str = "uncertainty.num_samples"
                         ) -> None:
    """A client's K over the tier's cap -> INVALID_ARGUMENT naming the flag that raises it."""
    if num_samples > cap:
        raise InvalidArgument(f"{field} (K) is {num_samples}; this tier allows at most {cap} "
                              f"(--max-uncertainty-samples, up to {MAX_SAMPLES}): send a "
                              f"smaller K, or 0 for the tier's default")


def check_caps(max_client_samples: int, default_samples: int, max_sessions: int,
               max_sessions_per_client: int) -> None:
    """Startup checks of the cap flags; ValueError names the flag."""
    if not 1 <= max_client_samples <= MAX_SAMPLES:
        raise ValueError(f"--max-uncertainty-samples must be in [1, {MAX_SAMPLES}], got "
                         f"{max_client_samples}")
    if default_samples > max_client_samples:
        raise ValueError(f"--uncertainty-samples {default_samples} is over "
                         f"--max-uncertainty-samples {max_client_samples}")
    if max_sessions_per_client < 1:
        raise ValueError(f"--max-sessions-per-client must be >= 1, got {max_sessions_per_client}")
