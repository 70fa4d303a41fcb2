"""Every seeded random stream of the project, and the one function that derives their seeds.

A request (or session) has one seed. Everything random that must be reproducible from it draws
from its own stream: `derive_seed(seed, position, Stream.X)`. Seeding by position (not by call)
makes "roll back, then draft again" reproducible; separate streams keep draws that must be
independent (the drafter's sampling, a verifier's accept uniforms, the engine's bonus sample)
uncorrelated even though they come from one seed and the same positions.
"""

from __future__ import annotations

import enum

_MASK64 = (1 << 64) - 1


class Stream(enum.IntEnum):
    """The seed streams. Values are part of reproducibility (a seeded run gives the same draws
    across versions only while they stay): add new streams, do not renumber."""

    # Drafter tier, per session seed and absolute position:
    DRAFT_SAMPLE = 0  # the vLLM seed of one Draft request (the drafter's sampling)
    PERTURBATION = 1  # the perturbed-temperature noise of u (drafter, and a verifier's emitted u)
    DRAFT_DRAW = 4  # the uniform the drafter's processor draws each token from its q with
    # Verifier tier, per session seed and position of the Verify:
    VERIFY_DRAWS = 2  # the worker's accept uniforms, then the recovered or bonus token's draw
    VERIFY_SAMPLE = 3  # the engine's own sample of the request (its seed; unused by the math)
    # Router, per request seed (position 0): each tier's session seed, and `rand`'s coin.
    SESSION_SLM = 11
    SESSION_ILM = 12
    SESSION_LLM = 13
    RAND_POLICY = 14
    CHOICE = 15  # the request seed of choice i > 0 of an `n` > 1 request (position i)
    # Offline gate evaluation of a freshly trained zoo (hilm_vllm/zoo/gates.py).
    ZOO_DRAFT = 101
    ZOO_PERTURBATION = 102


def derive_seed(seed: int, position: int, stream: int = 0) -> int:
    """A 63-bit seed (what torch generators and vLLM's msgpack transport take) for (seed,
    position, stream), SplitMix64-mixed."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + int(stream)) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1
