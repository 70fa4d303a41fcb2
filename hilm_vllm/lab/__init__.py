"""The lab: what measures the serving system, never part of it.

- `bench/`: the benchmarks (`hilm bench ...`), each writing JSON under bench/results/
- `soak/`: hours of load against a running stack, memory slopes
- `dsi/`: distributed speculative inference, modelled and run offline
- `calibration.py`, `calibrate_cli.py`: the uncertainty thresholds (`hilm calibrate`)
- `quality.py`: scoring generated text against held-out references
- `benchjson.py`: the JSON every benchmark writes (config, git commit, machine, results)

Serving code (the tiers, the router, the launchers) never imports this package; an
import-linter contract in pyproject.toml keeps it so (tests/test_architecture.py).
"""
