"""The CLI and the client library that LIPs import."""
