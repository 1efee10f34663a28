"""A cheap, stable fingerprint of a model checkpoint, so persisted KV is never read by
another model.

Block hashes cover token ids only: two checkpoints with the same architecture (a base
model and its fine-tune) would otherwise share keys in a disk directory or a Redis server
and read each other's KV. The fingerprint hashes `config.json` and, for every weight file,
its name, size and first and last MiB (real tensor data, which differs between fine-tunes)
— milliseconds even for a large checkpoint, unlike hashing all of its bytes.
"""

from __future__ import annotations

from pathlib import Path

import xxhash

SAMPLE_BYTES = 1 << 20
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


def model_fingerprint(model_dir: str | Path) -> int:
    model_dir = Path(model_dir)
    digest = xxhash.xxh64(b"pdserve-model-v1")
    config = model_dir / "config.json"
    if config.exists():
        digest.update(config.read_bytes())
    weights = sorted({p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
    for path in weights:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            if size > SAMPLE_BYTES:
                f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.intdigest()
