"""The exceptions pdserve raises, rooted in one base class.

    PdserveError
    ├── ConfigError           a configuration value is invalid (names the field)
    ├── ModelLoadError        a model folder is missing a file or a file is malformed (names the file)
    ├── InvalidRequestError   a request cannot be served as given (bad parameter, too long, ...)
    ├── ServiceUnavailableError  no usable worker for a role the request needs (HTTP 503)
    └── RequestFailedError    a request that was accepted failed inside the serving system
                              (a worker died, a KV transfer timed out); HTTP 500, or an
                              error event when the stream has already started

Running out of KV blocks is *not* an error: the block manager answers "no" and the
scheduler waits or preempts. HTTP status codes and OpenAI error bodies are made only in
the API layer, which maps these classes at its boundary.
"""

from __future__ import annotations


class PdserveError(Exception):
    """Base class of every error pdserve raises on purpose."""


class ConfigError(PdserveError, ValueError):
    """A configuration value is invalid; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelLoadError(PdserveError):
    """A model folder cannot be loaded; the message names the offending file."""

    def __init__(self, path: object, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class InvalidRequestError(PdserveError, ValueError):
    """A request cannot be served as given (bad parameter, prompt too long, ...)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ServiceUnavailableError(PdserveError):
    """No worker can take the request now (none registered, all dead, or overloaded)."""


class RequestFailedError(PdserveError):
    """An accepted request failed inside the system (worker lost, transfer timed out)."""
