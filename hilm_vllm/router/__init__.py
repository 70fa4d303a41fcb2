"""The router tier: the policy loop, the OpenAI-compatible API, the network model."""
