"""Continue any KV file: generate from where it ends, streaming the text.

    lipctl run examples/continue.py demo/chat-copy.kv 32

The path is inside the store (as under the mount, /kv/demo/chat-copy.kv); a mount path
such as /kv/demo/chat-copy.kv works too when the server tells the LIP its mount. Greedy
unless a temperature is given as the third argument.
"""

import os
import sys

from symphony.lipctl import SymphonyError, connect

if len(sys.argv) < 2:
    sys.exit("usage: continue.py PATH [MAX_TOKENS [TEMPERATURE]]")
path = sys.argv[1]
max_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 32
temperature = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
mount = os.environ.get("SYMPHONY_MOUNT")
if mount and os.path.isabs(path):  # a path on the mount names the same file
    path = os.path.relpath(path, mount)

try:
    with connect() as lip:
        kv = lip.kv(path)
        before = kv.stat()["tokens"]
        for piece in kv.generate_stream(max_tokens=max_tokens, temperature=temperature):
            print(piece, end="", flush=True)
        print(f"\n[{path}: {before} -> {kv.stat()['tokens']} tokens]")
except SymphonyError as exc:
    sys.exit(f"continue.py: {exc}")
