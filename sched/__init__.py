"""The syscall server, process table and two-level scheduler (next issues)."""
