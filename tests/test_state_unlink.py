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


def test_the_tree_is_made_again_only_when_names_owners_or_modes_change(tmp_path):
    """An fsync loop does not walk every name each time; any change of the tree does."""
    from symphony.fs.persistence import StateDir
    from symphony.fs.store import KVStore

    engine = make_tiny_engine(num_pages=16, page_size=4)
    store = KVStore(engine.pool, engine.fingerprint, engine.model_config.vocab_size, 64)
    store.ns.mkdir("d", ROOT)
    file = store.ns.create_file("d/f.kv", ROOT, 0o600, "")
    state = StateDir(tmp_path / "state", store)
    state.prepare(file)
    first, again = state.prepare_tree(), state.prepare_tree()
    assert again.data is first.data and again.seq > first.seq
    file.token_ids = [1]  # data changes leave the tree as it is
    file.pages = store.allocate(1)
    file.touch()
    assert state.prepare_tree().data is first.data
    for change in (
        lambda: store.ns.chmod("d/f.kv", ROOT, 0o644),
        lambda: store.ns.chown("d", ROOT, 1000, None),
        lambda: store.ns.rename("d/f.kv", "d/g.kv", ROOT),
        lambda: store.ns.mkdir("e", ROOT),
    ):
        before = state.prepare_tree().data
        change()
        assert state.prepare_tree().data != before
    state.disk.write([state.prepare(store.ns.lookup_file("d/g.kv", ROOT))], state.prepare_tree())
    again_store = KVStore(engine.pool, engine.fingerprint, engine.model_config.vocab_size, 64)
    StateDir(tmp_path / "state", again_store).restore()
    restored = again_store.ns.lookup_file("d/g.kv", ROOT)
    assert restored.mode & 0o777 == 0o644 and again_store.ns.lookup("d", ROOT).uid == 1000
