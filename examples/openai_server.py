"""An OpenAI-compatible HTTP server, as a LIP: the `openai` client, curl and the tools
built on them talk to Symphony through it.

    lipctl run examples/openai_server.py --port 8000 [--host 127.0.0.1] [--api-key KEY]
    curl http://127.0.0.1:8000/v1/models

`n` choices are forks of one prefilled file, a chat that repeats its history finds it in
the prefix cache, `response_format` and demanded tool calls are the generate's grammar.
The program is symphony/lipctl/openai_api (so `lipctl serve --openai PORT` can start it
without this folder); it uses the client library alone.
"""

from symphony.lipctl.openai_api.__main__ import main

main()
