"""KV transfer between workers; see `base.py`. Constants here stay torch-free so the
launcher can clean up shared pools without importing torch."""

import os
from pathlib import Path

SHM_DIR = Path(os.environ.get("PDSERVE_SHM_DIR", "/dev/shm"))
SHM_PREFIX = "pdserve-kv-"
