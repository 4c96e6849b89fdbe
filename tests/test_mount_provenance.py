"""Provenance on the mount: getfattr tells computed from imported, and reading
user.kv.verify recomputes a file (a faithful copy becomes computed, a forgery does not)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

from symphony.lipctl import connect


def xattr(path: str, name: str) -> str:
    return os.getxattr(path, name).decode()


def test_origin_and_verify_through_getfattr(mounted, tmp_path):
    mount, socket = mounted
    with connect(socket) as lip:
        lip.kv("a.kv", create=True).append(list(range(40, 58)))
    a = os.path.join(mount, "a.kv")
    assert xattr(a, "user.kv.origin") == "computed"
    outside = tmp_path / "a.kv"
    shutil.copyfile(a, outside)
    data = bytearray(outside.read_bytes())
    num_pages, page_bytes = int(xattr(a, "user.kv.pages")), os.stat(a).st_blksize
    first_page = len(data) - num_pages * page_bytes
    (value,) = struct.unpack_from("<f", data, first_page)
    struct.pack_into("<f", data, first_page, value + 1.0)  # the first K value, off by 1
    forged = tmp_path / "forged.kv"
    forged.write_bytes(bytes(data))
    subprocess.run(["cp", str(outside), os.path.join(mount, "copy.kv")], check=True)
    subprocess.run(["cp", str(forged), os.path.join(mount, "forged.kv")], check=True)
    copy, fake = os.path.join(mount, "copy.kv"), os.path.join(mount, "forged.kv")
    assert xattr(copy, "user.kv.origin") == xattr(fake, "user.kv.origin") == "imported by uid 0"
    out = subprocess.run(
        ["getfattr", "--only-values", "-n", "user.kv.verify", copy],
        check=True,
        capture_output=True,
        text=True,
    )
    report = json.loads(out.stdout)
    assert report["match"] and report["origin"] == "computed"
    assert xattr(copy, "user.kv.origin") == "computed"
    bad = json.loads(xattr(fake, "user.kv.verify"))
    assert not bad["match"] and bad["max_abs_diff"] > bad["tolerance"]
    assert xattr(fake, "user.kv.origin") == "imported by uid 0"
    assert "user.kv.origin" in os.listxattr(a)
