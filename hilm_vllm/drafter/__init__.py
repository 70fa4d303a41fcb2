"""Drafter tier (`hilm-serve --tier slm`): drafting with same-step uncertainty on vLLM."""
