"""The control plane: who serves, in which state, and what happens to requests when that
changes. Torch-free, and apart from the data path (`router/`, `worker/`, `engine/`,
`transfer/`), which asks it who is alive and never decides membership itself.

- `workers.py`: the pool of worker handles the data path reads (role, load, alive);
- `membership.py`: worker leases, incarnations and fencing;
- `migration.py`: a request's retry budget and how it resumes on another worker;
- `launcher.py`: the worker processes of `pdserve serve` (start, restart with backoff,
  kill, stop), behind an interface other launchers (Ray) implement.
"""
