"""The KV store and the filesystem that shows it (next issues)."""
