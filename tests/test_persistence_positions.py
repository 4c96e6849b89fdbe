"""--state keeps what issue 10 added to a file: its positions (byte format version 2),
the first custom token, and the attention ranges of masked tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from symphony.fs import kv_format
from symphony.fs.nodes import KVFile
from tests.test_persistence import PS, Run, aside


def custom_and_plain(run: Run) -> dict[str, KVFile]:
    """custom.kv: 37 tokens, the last 27 at 20.. (as a kv_drop without re-rotation
    leaves them); plain.kv: 18 at their indices. Saved."""
    custom = run.new("custom.kv", list(range(3, 3 + 2 * PS + 5)))
    custom.positions = list(range(10)) + list(range(20, 20 + custom.num_tokens - 10))
    custom.custom_from = 10
    custom.masks = {36: [0, 5, 36, 37], 12: [12, 13]}  # two tokens computed under masks
    run.new("plain.kv", list(range(40, 40 + PS + 2)))
    run.state.save_all()
    return run.files()


def reseal(path: Path, **fields: object) -> None:
    """Rewrite the sealed JSON file `path` with `fields` changed (None: removed)."""
    from symphony.fs.state_files import seal, unseal

    body = unseal(path.read_bytes())
    for key, value in fields.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    path.write_bytes(seal(body))


def record_path(run: Run, file: KVFile) -> Path:
    return run.state.path / "records" / f"{run.state.record_ids[file.inode]}.json"


def test_positions_survive_a_restart_and_a_plain_file_has_none(tmp_path):

    run = Run(tmp_path)
    files = custom_and_plain(run)
    before = run.view()  # the exported bytes hold the positions
    plain_record = json.loads(record_path(run, files["plain.kv"]).read_bytes())
    assert "positions" not in plain_record and "custom_from" not in plain_record

    again = Run(tmp_path)
    restored = again.files()
    custom, plain = restored["custom.kv"], restored["plain.kv"]
    assert (custom.positions, custom.custom_from) == (files["custom.kv"].positions, 10)
    assert custom.masks == {36: [0, 5, 36, 37], 12: [12, 13]}
    assert (plain.positions, plain.custom_from, plain.masks) == (None, None, {})
    assert again.view() == before
    assert again.store.index is not None  # restored pages are not indexed, custom or not
    assert not any(again.store.index.is_indexed(p) for f in restored.values() for p in f.pages)
    again.state.save_all()  # and the next restart again
    assert Run(tmp_path).view() == before


def test_a_record_saved_before_positions_were_kept_restores_at_default_positions(tmp_path):
    run = Run(tmp_path)
    files = custom_and_plain(run)
    reseal(record_path(run, files["custom.kv"]), positions=None, custom_from=None)
    custom = Run(tmp_path).files()["custom.kv"]
    assert (custom.positions, custom.custom_from) == (None, None)
    assert custom.token_ids == files["custom.kv"].token_ids


@pytest.mark.parametrize(
    "fields",
    [
        {"positions": list(range(36))},  # one short
        {"positions": [*range(36), 512]},  # past the context
        {"positions": [*range(36), True]},
        {"positions": [*range(36), 36.0]},
        {"positions": "0..36"},
        {"custom_from": 37},
        {"custom_from": -1},
        {"custom_from": "10"},
        {"masks": [[36, [0, 5, 36]]]},  # odd
        {"masks": [[36, [0, 5, 3, 37]]]},  # overlapping
        {"masks": [[36, [0, 36]]]},  # not the token itself
        {"masks": [[37, [0, 38]]]},  # no such token
        {"masks": {"36": [0, 37]}},
    ],
)
def test_a_record_with_bad_positions_is_set_aside_and_the_rest_restores(tmp_path, fields):
    run = Run(tmp_path)
    files = custom_and_plain(run)
    reseal(record_path(run, files["custom.kv"]), **fields)
    again = Run(tmp_path)
    assert again.restored == 1 and list(again.files()) == ["plain.kv"]
    assert aside(tmp_path) == ["custom.kv"]


def test_a_tree_saved_with_the_first_kv_format_version_in_its_geometry_restores(tmp_path):
    """Trees saved before version 2 of the byte format kept its version, 1, in their
    geometry; the pages they list do not depend on it."""
    run = Run(tmp_path)
    custom_and_plain(run)
    before = run.view()
    geometry = kv_format.geometry(run.store.pool, run.store.fingerprint)
    reseal(tmp_path / "namespace.json", geometry={**geometry, "version": 1})
    again = Run(tmp_path)
    assert again.restored == 2 and again.view() == before and aside(tmp_path) == []
