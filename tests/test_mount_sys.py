"""/.sys on a real mount: the control file and the per-file text views."""

from __future__ import annotations

import json
import os

from symphony.lipctl import connect
from tests.mount_helpers import NOBODY, needs_fuse, sh

pytestmark = needs_fuse


def ctl(mount: str, *lines: str, user: int | None = None) -> list[str]:
    """Open /.sys/ctl read-write in a shell (as `user`), write the lines, read the replies."""
    script = 'exec 3<>"$1/.sys/ctl"; shift; printf "%s\\n" "$@" >&3; cat <&3'
    out = sh("sh", "-c", script, "sh", mount, *lines, user=user)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_ctl_answers_each_line_in_order_like_the_syscalls(mounted):
    mount, socket = mounted
    replies = ctl(
        mount,
        "mkdir ctx",
        "kv_open ctx/a.kv create=true",
        'forward ctx/a.kv text="hello there, world"',
        "kv_fork ctx/a.kv ctx/b.kv",
        'generate ctx/b.kv max_tokens=5 sampler={"temperature": 0}',
        "kv_stat ctx/nope.kv",
        "frobnicate",
        "forward ctx/a.kv [1, 2",
        "kv_truncate ctx/a.kv 4",
    )
    assert len(replies) == 9
    ok = [json.loads(r.removeprefix("ok ")) for r in replies if r.startswith("ok ")]
    assert len(ok) == 6
    assert ok[2]["tokens"] == len("hello there, world")  # the tiny model's byte tokenizer
    assert ok[3]["shared_pages"] == ok[3]["pages"] > 0
    assert replies[5].startswith("error ENOENT ")
    assert replies[6].startswith("error ENOSYS ")
    assert replies[7].startswith("error EINVAL ")
    assert ok[5]["tokens"] == 4
    with connect(socket) as lip:
        # the same continuation through the client library, from the same prefix
        lip.kv("ctx/a.kv").truncate(0)
        kv = lip.kv("ctx/c.kv", create=True)
        kv.append(lip.tokenize("hello there, world"))
        assert kv.generate(max_tokens=5, temperature=0).text == ok[4]["text"]
        assert lip.kv("ctx/b.kv").stat()["tokens"] == ok[4]["tokens"] > ok[3]["tokens"]


def test_ctl_write_only_runs_the_command_and_checks_the_opener(mounted):
    mount, socket = mounted
    with connect(socket) as lip:
        lip.kv("mine.kv", create=True, mode=0o600).append([5, 6, 7])
    assert sh("sh", "-c", f"echo 'kv_fork mine.kv copy.kv' > {mount}/.sys/ctl").returncode == 0
    # a last line without a newline runs too
    assert sh("sh", "-c", f"printf 'kv_fork mine.kv copy2.kv' > {mount}/.sys/ctl").returncode == 0
    with connect(socket) as lip:
        assert lip.kv("copy.kv").stat()["tokens"] == 3
        assert lip.kv("copy2.kv").stat()["tokens"] == 3
    # another uid's lines run with that uid's rights
    (reply,) = ctl(mount, "kv_fork mine.kv stolen.kv", user=NOBODY)
    assert reply.startswith("error EACCES ")
    (reply,) = ctl(mount, "kv_open theirs.kv create=true", user=NOBODY)
    assert json.loads(reply.removeprefix("ok "))["uid"] == NOBODY


def test_text_views_mirror_the_tree_with_its_permissions(mounted):
    mount, socket = mounted
    with connect(socket) as lip:
        lip.mkdir("notes", mode=0o755)
        lip.kv("notes/open.kv", create=True, mode=0o644).append(lip.tokenize("shared text"))
        lip.kv("notes/closed.kv", create=True, mode=0o600).append(lip.tokenize("secret"))
        ids = lip.kv("notes/open.kv").stat()["tokens"]
    view = os.path.join(mount, ".sys", "text", "notes")
    assert sorted(os.listdir(view)) == ["closed.kv", "open.kv"]
    with open(os.path.join(view, "open.kv")) as f:
        assert f.read() == "shared text"
    with open(os.path.join(mount, ".sys", "tokens", "notes", "open.kv")) as f:
        rows = [line.split("\t") for line in f.read().splitlines()]
    assert len(rows) == ids
    assert [json.loads(r[2]) for r in rows] == list("shared text")
    assert [int(r[0]) for r in rows] == list(range(ids))
    # the kernel checks the mirrored mode: nobody reads the text of a 0600 file
    assert sh("cat", os.path.join(view, "open.kv"), user=NOBODY).stdout == "shared text"
    refused = sh("cat", os.path.join(view, "closed.kv"), user=NOBODY)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    assert sh("touch", os.path.join(view, "new.kv")).returncode != 0  # read-only


def test_a_line_too_long_is_answered_e2big_and_the_next_one_runs(mounted):
    mount, _ = mounted
    with open(os.path.join(mount, ".sys", "ctl"), "r+b", buffering=0) as ctl:
        ctl.write(b"tokenize " + b"x" * (1 << 20))  # over the limit, not yet ended
        ctl.write(b"x" * 1000 + b"\nmkdir after\n")
        out = b""
        while chunk := ctl.read(4096):  # replies until none is pending: EOF
            out += chunk
    replies = out.decode().splitlines()
    assert len(replies) == 2 and replies[0].startswith("error E2BIG ")
    assert replies[1] == "ok null"
    assert os.path.isdir(os.path.join(mount, "after"))


def test_ctl_answers_the_new_forward_in_json(mounted):
    """Outputs, raw logits (base64 of the fp32 bytes) and verify, as shell lines."""
    import base64
    import struct

    mount, _ = mounted
    replies = ctl(
        mount,
        "kv_open o.kv create=true",
        'forward o.kv text="abc" outputs=[{"at": [0, 2], "top_k": 2, "logits": true}]',
        "verify o.kv draft=[100, 101]",
        "forward o.kv tokens=[5] mask=[1]",
    )
    assert [r.split()[0] for r in replies] == ["ok", "ok", "ok", "error"], replies
    forward = json.loads(replies[1].removeprefix("ok "))
    assert [o["at"] for o in forward["outputs"]] == [0, 2]
    raw = base64.b64decode(forward["outputs"][1]["logits"])
    logits = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert (
        len(logits) == 259
        and max(range(259), key=logits.__getitem__) == forward["outputs"][1]["top_k"][0][0]
    )
    verified = json.loads(replies[2].removeprefix("ok "))
    assert verified["token_ids"][-1] == verified["token"]
    assert replies[3].startswith("error EINVAL ") and "allowed" in replies[3]
