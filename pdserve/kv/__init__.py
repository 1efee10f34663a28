"""KV-cache bookkeeping shared by every process: block hashes (and, later, tiers and layout)."""
