"""An OpenAI-compatible HTTP server, written as a LIP on the client library alone.

`examples/openai_server.py` runs it (`lipctl run examples/openai_server.py --port 8000`).
It speaks `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions` over
hypercorn (ASGI, on trio), and serves them the way a program can: `n` by copy-on-write
forks of one prefilled file, a chat history by the prefix cache, `response_format` by
the grammar of the generate.
"""

from symphony.lipctl.openai_api.app import serve

__all__ = ["serve"]
