"""Request migration: the retry budget, and how a request resumes on another worker.

When the worker running a request dies, is fenced or drained, or fails the step the
request ran in, the router moves the request (Dynamo's migration, with no token lost):

- the tokens the client has been sent are exactly the tokens the router has received,
  so the new attempt is told them (`AddRequest.output_token_ids`); the worker recomputes
  prompt + those tokens — as after a preemption, served from its prefix cache and KV
  tiers where they hold the blocks — and samples the next token at the next output
  index, so `max_tokens`, `min_tokens`, stop state and a seed's (seed, index) stream
  continue exactly where they stopped;
- outputs of the old attempt that arrive later are ignored (each attempt has its own
  worker-side request id), so the stream never shows a token twice;
- a request that has no output yet simply starts again (prefill workers included);
- a request is moved at most `max_migrations` times; past that, or with no live worker
  for `migration_wait_s`, it fails with a 503-class error instead of hanging.

Greedy requests resume with the tokens an undisturbed run gives whenever the recomputed
logits equal the decoded ones, which batch-invariant mode (`--batch-invariant`) makes
exact by construction; seeded sampling likewise.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.errors import ConfigError

ATTEMPT_SEPARATOR = "~m"  # worker-side request id of attempt k > 0: f"{child_id}~m{k}"


@dataclass(frozen=True)
class MigrationConfig:
    max_migrations: int = 3  # per request; 0 turns migration off
    migration_wait_s: float = 30.0  # for a live worker that can take it

    def __post_init__(self) -> None:
        if self.max_migrations < 0:
            raise ConfigError("max_migrations", "must be >= 0")
        if self.migration_wait_s < 0:
            raise ConfigError("migration_wait_s", "must be >= 0")


def attempt_request_id(child_id: str, attempt: int) -> str:
    """The id workers know attempt `attempt` of a request sample by."""
    return child_id if attempt == 0 else f"{child_id}{ATTEMPT_SEPARATOR}{attempt}"
