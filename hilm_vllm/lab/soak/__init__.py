"""Soak and fault runs: Locust users of the router (`users`), and the harness that launches the
four tiers, drives Locust, samples memory and sessions, and injects faults (`harness`)."""

# Lossy and lossless policies alike; the users cycle through them (each user in its own order).
DEFAULT_POLICIES = "hilm,uhlm,rand,spec,cascade,hlm,llm-only"
