"""The CLI and the client library that LIPs import."""

from symphony.lipctl.client import KV, Lip, SymphonyError, connect

__all__ = ["KV", "Lip", "SymphonyError", "connect"]
