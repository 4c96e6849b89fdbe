"""A server with --state forgets a file on disk when its last name goes (wired through
the store's last-link hook, not only at the next save)."""

from __future__ import annotations

import os

from symphony.fs.nodes import ROOT
from symphony.lipctl import connect
from tests.conftest import make_tiny_engine
from tests.server_helpers import ServerThread


def disk_bytes(folder: str) -> int:
    return sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files
    )


def test_fsync_then_unlink_rounds_do_not_grow_the_state(tmp_path):
    state = str(tmp_path / "state")
    engine = make_tiny_engine(num_pages=64, page_size=4)
    thread = ServerThread(engine, str(tmp_path / "s.sock"), state=state).start()
    try:
        srv = thread.server
        with connect(srv.config.socket_path) as lip:
            sizes = []
            for i in range(4):
                kv = lip.kv("f.kv", create=True)
                kv.append([5 + i, 6, 7, 8, 9, 10, 11])
                thread.run_sync(lambda: srv.state.save_file(srv.store.ns.lookup_file("f.kv", ROOT)))
                kv.unlink()
                sizes.append(disk_bytes(state))
        assert sizes[-1] <= sizes[0]
        assert not os.listdir(os.path.join(state, "records"))
    finally:
        thread.stop()
