"""A restart comes up as it went down (--state DIR), on the tiny engine and the store.

Each scenario saves a store, "restarts" into a fresh engine and store, and compares
what every file holds and shares; check_invariants() after every restore.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from symphony.engine.engine import Engine
from symphony.fs import kv_format
from symphony.fs.nodes import ROOT, Cred, Directory, KVFile
from symphony.fs.persistence import StateDir
from symphony.fs.store import KVStore
from tests.conftest import make_tiny_engine

PS = 16  # page size, as the server's default
NOBODY = Cred(65534, 65534)


class Run:
    """One server's life: an engine, its store and the state directory."""

    def __init__(self, state: Path, num_pages: int = 64, restore: bool = True) -> None:
        self.engine: Engine = make_tiny_engine(num_pages=num_pages, page_size=PS)
        vocab = self.engine.model_config.vocab_size
        self.store = KVStore(self.engine.pool, self.engine.fingerprint, vocab, 512)
        self.store.ns.chmod("", ROOT, 0o1777)
        self.state = StateDir(state, self.store)
        self.restored = self.state.restore() if restore else 0
        self.store.check_invariants()

    def new(self, path: str, ids: list[int], cred: Cred = ROOT) -> KVFile:
        file = self.store.open(path, cred, create=True)
        self.append(file, ids)
        return file

    def append(self, file: KVFile, ids: list[int]) -> None:
        plan = self.store.begin_append(file, ids)
        self.engine.step([plan.chunk()])
        self.store.finish_append(plan)

    def files(self) -> dict[str, KVFile]:
        """Every name, with its file."""
        names: dict[str, KVFile] = {}
        ns = self.store.ns
        for node in ns.nodes.values():
            if isinstance(node, Directory):
                base = ns.path_of(node.inode)
                for name, child in node.children.items():
                    if isinstance(file := ns.nodes[child], KVFile):
                        names[f"{base}/{name}" if base else name] = file
        return names

    def view(self) -> dict[str, tuple[object, ...]]:
        """What a user sees of each file: its bytes, sharing, domain, owner and mode."""
        store = self.store
        out = {}
        for path, f in self.files().items():
            stat = store.file_stat(f)
            out[path] = (exported(store, f), stat["shared_pages"], f.domain, f.page_hashes)
            out[path] += (f.mode, f.uid, f.origin)
        return out


def exported(store: KVStore, file: KVFile) -> bytes:
    """The file's bytes, as reading it in the mount gives them."""
    pool, n = store.pool, file.num_tokens
    lay = kv_format.layout(
        pool, store.fingerprint, file.token_ids, len(file.pages), file.position_list()
    )
    pages = [pool.page_bytes(p, kv_format.slots_filled(n, PS, i)) for i, p in enumerate(file.pages)]
    return lay.head + b"".join(pages)


def aside(state: Path) -> list[str]:
    return sorted(os.listdir(state / "aside")) if (state / "aside").exists() else []


def disk_usage(state: Path) -> tuple[int, int]:
    """(files, bytes) in the state directory, but what was set aside."""
    sizes = [
        os.path.getsize(os.path.join(top, name))
        for top, dirs, names in os.walk(state)
        if Path(top).relative_to(state).parts[:1] != ("aside",)
        for name in names
    ]
    return len(sizes), sum(sizes)


@pytest.mark.parametrize("saved_by", ["save_all", "fsync of each file"])
def test_forks_cut_inside_a_page_restore_as_the_pages_they_share(tmp_path, saved_by):
    """uid 65534 holds 5 of 64 pages: a file of 80 tokens and 75 forks cut at every
    length inside a page. Saved as copies, they needed 80 pages and the restart died."""
    run = Run(tmp_path)
    base = run.new("base.kv", [(7 * i) % 250 for i in range(5 * PS)], NOBODY)
    cuts = [n for n in range(1, 5 * PS) if n % PS]
    assert len(cuts) == 75
    for n in cuts:
        run.store.fork("base.kv", f"cut{n}.kv", NOBODY)
        run.store.truncate(f"cut{n}.kv", n, NOBODY)
    assert run.store.pool.num_used == 5
    before = run.view()
    if saved_by == "save_all":
        run.state.save_all()
    else:
        for file in run.files().values():
            run.state.save_file(file)
    assert base.pages  # the state has the pages only once: 5 blobs
    assert len(os.listdir(tmp_path / "pages")) == 5

    again = Run(tmp_path)
    assert again.restored == 76
    assert again.store.pool.num_used == 5
    assert again.view() == before
    assert aside(tmp_path) == []
    # a second restart from what the first wrote is the same
    again.state.save_all()
    third = Run(tmp_path)
    assert third.view() == before and third.store.pool.num_used == 5


def test_each_uid_keeps_its_domain_and_shares_only_what_it_shared(tmp_path):
    """root's file with secret tokens and uid 65534's file with the same tokens hold equal
    bytes in separate pages; a restart must not make them share (0 shared pages before)."""
    run = Run(tmp_path)
    secret = [(13 * i + 5) % 250 for i in range(3 * PS + 3)]
    mine = run.new("root.kv", secret)
    theirs = run.new("nobody.kv", secret, NOBODY)
    run.store.fork("nobody.kv", "nobody-fork.kv", NOBODY)
    assert run.store.pool.page_bytes(mine.pages[0]) == run.store.pool.page_bytes(theirs.pages[0])
    before, used = run.view(), run.store.pool.num_used
    assert before["root.kv"][1] == 0 and before["nobody.kv"][1] == 4
    run.state.save_all()

    again = Run(tmp_path)
    assert again.view() == before
    assert again.store.pool.num_used == used
    assert {f.domain for f in again.files().values()} == {"uid:0", "uid:65534"}


def test_origin_survives_a_restart(tmp_path):
    run = Run(tmp_path)
    file = run.new("a.kv", [1, 2, 3])
    file.origin = "imported by uid 65534"
    run.state.save_file(file)
    again = Run(tmp_path)
    assert again.files()["a.kv"].origin == "imported by uid 65534"


def three_files(run: Run) -> dict[str, KVFile]:
    run.new("a.kv", list(range(3, 3 + 2 * PS + 5)))
    run.new("b.kv", list(range(40, 40 + PS + 2)), NOBODY)
    run.store.fork("a.kv", "c.kv", ROOT)
    run.state.save_all()
    return run.files()


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("part", ["record", "page"])
@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_file_is_set_aside_and_the_rest_restores(tmp_path, part, how):
    run = Run(tmp_path)
    files = three_files(run)
    before = run.view()
    record_id = run.state.record_ids[files["b.kv"].inode]
    if part == "record":
        damaged = tmp_path / "records" / f"{record_id}.json"
    else:  # a page of b alone
        digest = run.state.disk.records[record_id][-1][1]
        assert run.state.disk.blob_refs[digest] == 1
        damaged = tmp_path / "pages" / digest
    damage(damaged, how)

    again = Run(tmp_path)
    assert again.restored == 2
    assert again.view() == {k: v for k, v in before.items() if k != "b.kv"}
    assert aside(tmp_path) == ["b.kv"]
    kept = os.listdir(tmp_path / "aside" / "b.kv")
    assert f"{record_id}.json" in kept and "reason" in kept  # nothing deleted
    if part == "page":
        assert damaged.name in kept
    # the next start sees a clean state
    assert Run(tmp_path).view() == again.view()
    assert aside(tmp_path) == ["b.kv"]


def test_a_damaged_tree_sets_the_state_aside_and_starts_empty(tmp_path):
    run = Run(tmp_path)
    three_files(run)
    records = sorted(os.listdir(tmp_path / "records"))
    damage(tmp_path / "namespace.json", "flip")

    again = Run(tmp_path)
    assert again.restored == 0 and again.files() == {}
    assert aside(tmp_path) == ["state"]
    assert sorted(os.listdir(tmp_path / "aside/state/records")) == records
    again.new("new.kv", [1, 2, 3])
    again.state.save_all()
    assert list(Run(tmp_path).files()) == ["new.kv"]
    assert sorted(os.listdir(tmp_path / "aside/state/records")) == records


def test_a_smaller_pool_restores_what_fits_and_sets_the_rest_aside(tmp_path):
    run = Run(tmp_path)
    for i in range(4):
        run.new(f"f{i}.kv", [i + 1] * (2 * PS))  # two pages each
    before = run.view()
    run.state.save_all()

    small = Run(tmp_path, num_pages=5)
    assert small.restored == 2 and small.store.pool.num_used == 4
    assert small.view() == {k: before[k] for k in ("f0.kv", "f1.kv")}
    assert aside(tmp_path) == ["f2.kv", "f3.kv"]
    # what was set aside keeps its pages (hard links), though the state dropped them
    small.state.save_all()
    assert len(os.listdir(tmp_path / "pages")) == 4
    assert len(os.listdir(tmp_path / "aside" / "f3.kv")) == 2 + 2


def test_a_file_longer_than_the_context_is_set_aside(tmp_path):
    run = Run(tmp_path)
    run.new("long.kv", list(range(100)))
    run.new("short.kv", list(range(10)))
    run.state.save_all()
    again = Run.__new__(Run)
    again.engine = make_tiny_engine(num_pages=64, page_size=PS)
    vocab = again.engine.model_config.vocab_size
    again.store = KVStore(again.engine.pool, again.engine.fingerprint, vocab, 50)
    again.state = StateDir(tmp_path, again.store)
    assert again.state.restore() == 1
    again.store.check_invariants()
    assert list(again.files()) == ["short.kv"] and aside(tmp_path) == ["long.kv"]


def test_fsync_then_unlink_rounds_leave_nothing_behind(tmp_path):
    run = Run(tmp_path)
    run.state.save_all()
    empty = disk_usage(tmp_path)
    for i in range(5):
        file = run.new("f.kv", [(i + j) % 250 for j in range(3 * PS)])
        run.state.save_file(file)
        assert disk_usage(tmp_path)[1] > empty[1]
        run.store.unlink("f.kv", ROOT)
        run.state.forget(file.inode)  # as the store's last-link hook does
        assert disk_usage(tmp_path)[0] == empty[0] + 0  # only namespace.json
    assert Run(tmp_path).files() == {}


def test_saving_drops_records_of_files_that_are_gone(tmp_path):
    run = Run(tmp_path / "main")
    gone = run.new("gone.kv", list(range(2 * PS)))
    run.state.save_file(gone)
    run.store.unlink("gone.kv", ROOT)  # nobody told the state
    kept = run.new("kept.kv", list(range(100, 100 + PS)))
    run.state.save_file(kept)
    alone = Run(tmp_path / "alone")  # a state that only ever had kept.kv
    alone.state.save_file(alone.new("kept.kv", list(range(100, 100 + PS))))
    files, size = disk_usage(run.state.path)
    files_alone, size_alone = disk_usage(alone.state.path)
    assert files == files_alone and size < size_alone + 100
    assert list(Run(run.state.path).files()) == ["kept.kv"]


def test_unchanged_pages_are_not_written_again(tmp_path):
    run = Run(tmp_path)
    file = run.new("a.kv", list(range(3 * PS)))
    run.state.save_file(file)
    blobs = {p: (tmp_path / "pages" / p).stat().st_ino for p in os.listdir(tmp_path / "pages")}
    run.append(file, [1, 2, 3])
    run.state.save_file(file)
    after = {p: (tmp_path / "pages" / p).stat().st_ino for p in os.listdir(tmp_path / "pages")}
    assert len(after) == 4 and all(after[p] == ino for p, ino in blobs.items())


def test_sharing_survives_when_the_longest_sharer_is_cut_and_only_it_is_saved(tmp_path):
    run = Run(tmp_path)
    run.new("a.kv", list(range(2 * PS + 14)))
    run.store.fork("a.kv", "b.kv", ROOT)
    run.store.truncate("b.kv", 2 * PS + 4, ROOT)
    run.state.save_all()
    run.store.truncate("a.kv", 2 * PS + 2, ROOT)  # b is now the longest on that page
    run.state.save_file(run.files()["a.kv"])  # then the server is killed
    before = run.view()
    assert before["a.kv"][1] == 3
    assert Run(tmp_path).view() == before


def test_leftovers_of_a_crash_do_not_stop_a_restore(tmp_path):
    run = Run(tmp_path)
    three_files(run)
    record = next((tmp_path / "records").iterdir())
    (tmp_path / "records" / "0badcafe-99.json").write_bytes(record.read_bytes())  # no name
    (tmp_path / "pages" / "x.tmp").write_bytes(b"half")
    again = Run(tmp_path)
    assert again.restored == 3 and aside(tmp_path) == ["record%200badcafe-99"]
    again.state.save_all()
    assert "x.tmp" not in os.listdir(tmp_path / "pages")


def test_a_state_of_the_first_format_is_read_and_kept(tmp_path):
    import json

    run = Run(tmp_path / "unused")
    file = run.new("a.kv", list(range(PS + 3)))
    data = exported(run.store, file)
    old = tmp_path / "old"
    (old / "files").mkdir(parents=True)
    (old / "files" / "7.kv").write_bytes(data)
    owner = {"mode": 0o640, "uid": 65534, "gid": 65534}
    tree = {
        "version": 1,
        "model": run.store.fingerprint,
        "root": {"mode": 0o1777, "uid": 0, "gid": 0},
        "dirs": [{"path": "d", "mode": 0o755, "uid": 0, "gid": 0}],
        "files": [{"path": "d/a.kv", "inode": 7, "domain": "uid:65534", **owner}],
    }
    (old / "namespace.json").write_text(json.dumps(tree))
    again = Run(old)
    assert again.restored == 1
    (restored,) = again.files().values()
    assert restored.token_ids == file.token_ids and restored.domain == "uid:65534"
    assert (restored.uid, restored.origin) == (65534, "imported by uid 65534")
    assert os.listdir(old / "aside" / "v1-state" / "files") == ["7.kv"]
    assert list(Run(old).files()) == ["d/a.kv"]  # now in the current format


def test_a_state_of_another_page_size_is_set_aside(tmp_path):
    run = Run(tmp_path)
    run.new("a.kv", list(range(20)))
    run.state.save_all()
    engine = make_tiny_engine(num_pages=64, page_size=8)
    store = KVStore(engine.pool, engine.fingerprint, engine.model_config.vocab_size, 512)
    assert StateDir(tmp_path, store).restore() == 0
    store.check_invariants()
    assert aside(tmp_path) == ["state"] and store.ns.files() == []


class Killed(BaseException):
    """The server dies here (SIGKILL): nothing after this write happens."""


def test_a_kill_at_any_write_leaves_the_last_whole_state(tmp_path, monkeypatch):
    """Kill the server at each write of a few fsyncs and an unlink: every restart comes
    up, each file as it was before or after the save the kill interrupted."""
    import shutil

    from symphony.fs import state_disk, state_files

    base = tmp_path / "base"
    three_files(Run(base))
    real = state_files.write_atomically
    writes = [0, 0]  # done, the one that kills (0: none)

    def dying(path: Path, data: bytes) -> None:
        writes[0] += 1
        if writes[0] == writes[1]:
            path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
            raise Killed
        real(path, data)

    monkeypatch.setattr(state_files, "write_atomically", dying)
    monkeypatch.setattr(state_disk, "write_atomically", dying)

    def started(name: str) -> Run:
        shutil.copytree(base, tmp_path / name)
        return Run(tmp_path / name)

    def sequence(run: Run) -> None:
        a, b = run.files()["a.kv"], run.files()["b.kv"]
        run.append(a, [9, 8, 7])
        run.state.save_file(a)
        run.state.save_file(run.new("d.kv", list(range(30)), NOBODY))
        run.store.unlink("b.kv", NOBODY)
        run.state.forget(b.inode)
        run.state.save_namespace()

    old = {k: v[0] for k, v in started("old").view().items()}
    reference = started("new")
    writes[0] = 0
    sequence(reference)
    new = {k: v[0] for k, v in reference.view().items()}
    assert writes[0] == 8  # a's new page, record, tree; d's 2 pages, record, tree; tree
    for kill_at in range(1, writes[0] + 1):
        run = started(f"kill{kill_at}")
        writes[:] = [0, kill_at]
        with pytest.raises(Killed):
            sequence(run)
        writes[1] = 0
        after = Run(run.state.path)  # comes up; check_invariants inside
        for path, data in after.view().items():
            assert data[0] in (old.get(path), new.get(path)), (kill_at, path)
        assert {"a.kv", "c.kv"} <= set(after.files())
        assert all(name.startswith("record") for name in aside(run.state.path))


def test_a_write_in_a_worker_thread_and_a_forget_that_does_not_wait_for_it(tmp_path):
    """As the mount does on fsync: prepare in the store's thread, hold the pages, write
    in a worker; an unlink meanwhile is not blocked, and its record goes when the
    write ends."""
    import threading

    run = Run(tmp_path)
    gone = run.new("gone.kv", list(range(2 * PS)))
    run.state.save_file(gone)
    gone_record = tmp_path / "records" / f"{run.state.record_ids[gone.inode]}.json"
    file = run.new("f.kv", list(range(50, 50 + PS + 3)))
    save = run.state.prepare(file)
    assert save is not None
    before = exported(run.store, file)
    run.store.hold(save.pages)
    proceed, writing = threading.Event(), threading.Event()
    real_write = run.state.disk.pages.write

    def slow_write(digest: str, data: bytes) -> None:
        writing.set()
        assert proceed.wait(10)
        real_write(digest, data)

    run.state.disk.pages.write = slow_write  # type: ignore[method-assign]
    worker = threading.Thread(target=run.state.write, args=(save, run.state.prepare_tree()))
    worker.start()
    assert writing.wait(10)
    run.append(file, [1, 2])  # the held last page is copied, not written
    run.store.unlink("gone.kv", ROOT)
    run.state.forget(gone.inode)  # returns at once
    assert gone_record.exists()
    proceed.set()
    worker.join(10)
    run.store.unhold(save.pages)
    run.store.check_invariants()
    assert not gone_record.exists()
    assert len(os.listdir(tmp_path / "pages")) == 2  # f's, as prepared; none of gone's
    again = Run(tmp_path)
    assert list(again.files()) == ["f.kv"]
    assert exported(again.store, again.files()["f.kv"]) == before


def test_an_unlinked_files_tokens_leave_the_disk_from_a_page_it_shared(tmp_path):
    """root's file and uid 65534's fork cut inside its last page share that page; once
    root's file is unlinked and the fork saved again, no blob holds root's later slots."""
    run = Run(tmp_path)
    secret = run.new("secret.kv", list(range(60, 60 + PS + 14)))
    run.store.ns.chmod("secret.kv", ROOT, 0o644)
    run.store.fork("secret.kv", "cut.kv", NOBODY)
    run.store.truncate("cut.kv", PS + 4, NOBODY)
    run.state.save_all()
    run.store.unlink("secret.kv", ROOT)
    run.state.forget(secret.inode)
    cut = run.files()["cut.kv"]
    run.state.save_file(cut)
    pool = run.store.pool
    on_disk = {(tmp_path / "pages" / name).read_bytes() for name in os.listdir(tmp_path / "pages")}
    assert on_disk == {pool.page_bytes(cut.pages[0]), pool.page_bytes(cut.pages[1], 4)}
