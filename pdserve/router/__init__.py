"""The OpenAI-compatible HTTP front: request/response protocol and (later) the router; no torch."""
