"""KV files as plain files: a LIP that mixes syscalls with open, shutil.copy and os.unlink.

Run on a server started with `lipctl serve --mount DIR` (it tells the LIP where, in
SYMPHONY_MOUNT):

    lipctl run examples/mount_files.py
"""

import os
import shutil
import time

from symphony.lipctl import connect

mount = os.environ.get("SYMPHONY_MOUNT")
if not mount:
    raise SystemExit("this LIP needs a server started with --mount")

with connect() as lip:
    name = f"files-{time.time_ns()}"
    kv = lip.kv(f"{name}.kv", create=True)
    kv.append(lip.tokenize("A context made through the syscalls."))  # compute it
    src, dst = os.path.join(mount, f"{name}.kv"), os.path.join(mount, f"{name}-copy.kv")
    shutil.copyfile(src, dst)  # a fork, made with plain file operations
    print("copy tokens:", os.getxattr(dst, "user.kv.tokens").decode())
    print("copy shares:", os.getxattr(dst, "user.kv.shared_pages").decode(), "pages")
    print("copy blocks:", os.stat(dst).st_blocks, "(only pages it does not share count)")
    copy = lip.kv(f"{name}-copy.kv")  # and back to the syscalls on the same path
    print("continues:", repr(copy.generate(max_tokens=8, temperature=0).text))
    with open(src, "rb") as f:
        print("format:", f.read(8))
    os.unlink(dst)
    os.unlink(src)
    print("left:", [n for n in os.listdir(mount) if n.startswith(name)])
