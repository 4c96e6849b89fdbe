"""End to end: `lipctl serve` on the real model, LIPs as processes over the socket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from symphony.lipctl import SymphonyError, connect
from tests.server_helpers import ROOT, start_server_process, stop_server_process
from tests.spawn_helpers import reachable_by_others

pytestmark = pytest.mark.slow
NOBODY = 65534


@pytest.fixture(scope="module", autouse=True)
def checkout_reachable_by_others():
    """uid 65534 runs Python from this checkout: a clone in `mktemp -d` sits in a 0700
    folder (tests/spawn_helpers.py)."""
    with reachable_by_others():
        yield


@pytest.fixture(scope="module")
def server():
    # a folder every uid can reach, unlike pytest's own 0700 temporary folders
    folder = tempfile.mkdtemp(prefix="symphony-e2e-")
    os.chmod(folder, 0o755)
    path = os.path.join(folder, "symphony.sock")
    proc = start_server_process(path, "--pages", "2048")
    yield path
    err = stop_server_process(proc)
    shutil.rmtree(folder, ignore_errors=True)
    assert "Traceback" not in err, err


def run_as_nobody(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run Python `code` as uid and gid 65534, with no supplementary groups."""
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def wait_program(lip, pid: int) -> tuple[bytes, int]:
    out = b""
    it = lip.wait(pid)
    while True:
        try:
            item = next(it)
        except StopIteration as stop:
            return out, stop.value["exit_status"]
        if item["fd"] == 1:
            out += item["data"]
        else:
            sys.stderr.buffer.write(item["data"])


BRANCH_LIP = textwrap.dedent(
    """
    import sys
    from symphony.lipctl import connect
    i = int(sys.argv[1])
    with connect() as lip:
        kv = lip.kv("shared/prefix.kv").fork(f"shared/branch-{i}.kv")
        kv.append(lip.tokenize(f"Topic number {i}: "))
        print(kv.generate(max_tokens=10, temperature=0).text)
    """
)


def test_32_concurrent_lips_generate_what_each_does_alone(server):
    n = 32
    with connect(server) as lip:
        lip.mkdir("shared", parents=True)
        prefix = lip.kv("shared/prefix.kv", create=True, mode=0o644)
        prefix.append(
            lip.apply_chat_template(
                [{"role": "user", "content": "Write one sentence about a topic I name."}]
            )
        )
        alone = []
        for i in range(n):  # each alone: nothing else runs on the server meanwhile
            kv = prefix.fork(f"shared/alone-{i}.kv")
            kv.append(lip.tokenize(f"Topic number {i}: "))
            alone.append(kv.generate(max_tokens=10, temperature=0).text)
            kv.unlink()
        pids = [lip.spawn(BRANCH_LIP, [str(i)], name="branch.py") for i in range(n)]
        results = [wait_program(lip, pid) for pid in pids]
        assert [status for _, status in results] == [0] * n
        together = [out.decode().removesuffix("\n") for out, _ in results]
        assert together == alone
        assert len(set(alone)) > 1
        shared = lip.kv("shared/branch-0.kv").stat()["shared_pages"]
        assert shared >= 2  # the prefix's full pages stay shared with the prefix file
        for i in range(n):
            lip.kv(f"shared/branch-{i}.kv").unlink()
        prefix.unlink()


def test_sigkill_mid_generate_leaves_no_page_held(server):
    program = textwrap.dedent(
        """
        from symphony.lipctl import connect
        with connect() as lip:
            kv = lip.kv("victim.kv", create=True)
            kv.append(lip.tokenize("Count slowly: one, two,"))
            print("started", flush=True)
            ends = [t for s in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
                    for t in lip.tokenize(s)]
            kv.generate(max_tokens=4000, temperature=1.0, seed=3, blocked=ends)
        """
    )
    with connect(server) as lip:
        baseline = lip.status()["pages"]["used"]
        pid = lip.spawn(program, name="victim.py")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if lip.kv("victim.kv").stat()["tokens"] > 20:
                    break
            except SymphonyError:
                pass
            time.sleep(0.1)
        lip.kill(pid)
        while any(p["pid"] == pid and p["state"] == "running" for p in lip.ps()):
            time.sleep(0.05)
        deadline = time.monotonic() + 30
        while lip.status()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.05)
        row = next(p for p in lip.ps() if p["pid"] == pid)
        assert row["state"] == "killed"
        victim = lip.kv("victim.kv")
        stat = victim.stat()
        assert 20 < stat["tokens"] < 4000  # the file stays, as files do
        assert lip.status()["pages"]["used"] == baseline + stat["pages"]
        victim.unlink()
        assert lip.status()["pages"]["used"] == baseline
        assert lip.call("hello")["protocol"] == 2


OTHER_UID_CLIENT = textwrap.dedent(
    """
    import json, sys
    from symphony.lipctl import SymphonyError, connect
    out = {}
    with connect(sys.argv[1]) as lip:
        out["uid"] = lip.info["uid"]
        for name, op in [
            ("read", lambda: lip.kv("secret.kv")),
            ("fork", lambda: lip.call("kv_fork", src="secret.kv", dst="stolen.kv")),
            ("truncate", lambda: lip.call("kv_truncate", path="secret.kv", n=1)),
        ]:
            try:
                op()
                out[name] = "allowed"
            except SymphonyError as exc:
                out[name] = exc.errno
        before = lip.status()["tokens_computed"]
        mine = lip.kv("nobody.kv", create=True)
        mine.append(json.loads(sys.argv[2]))
        out["computed"] = lip.status()["tokens_computed"] - before
        mine.unlink()
    print(json.dumps(out))
    """
)


def test_another_uid_cannot_touch_roots_file_nor_hit_its_prefix(server):
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    with connect(server) as lip:
        prompt = lip.tokenize("A private system prompt that only root should ever see. " * 4)
        secret = lip.kv("secret.kv", create=True)
        secret.append(prompt)
        # root itself does hit its own prefix: a second file computes only the tail
        before = lip.status()["tokens_computed"]
        again = lip.kv("again.kv", create=True)
        again.append(prompt)
        page = lip.info["model"]["page_size"]
        assert len(prompt) > 2 * page
        assert lip.status()["tokens_computed"] - before == len(prompt) % page
        again.unlink()
        out = run_as_nobody(OTHER_UID_CLIENT, server, json.dumps(prompt))
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["uid"] == NOBODY
        assert (result["read"], result["fork"], result["truncate"]) == ("EACCES",) * 3
        assert result["computed"] == len(prompt)  # no prefix-cache hit on root's pages
        assert secret.stat()["tokens"] == len(prompt)
        secret.unlink()


@pytest.mark.parametrize(
    "example, args, expect",
    [
        ("fork_parallel.py", ["3", "8"], "shared by every branch"),
        ("prompt_cache.py", ["Name a prime number."], "A: "),
        ("beam_search.py", ["2", "4"], "beam 1:"),
        ("agent_calculator.py", ["What is 12 times 7?"], "calc: "),
        ("select_choice.py", ["Which is a fruit?", "an apple", "a car"], "chosen: "),
        ("speculative.py", ["24"], "same tokens: True"),
        ("json_extractor.py", ["Ada Lovelace, aged 36, lived in London."], "extracted: "),
        ("attention_sink_chat.py", ["10", "300"], "bounded: True"),
        ("document_modules.py", ["Where is the Louvre?", "louvre", "tower"], "A: "),
        (
            "guidance_decoding.py",
            ["Tell me about the moon.", "Answer like a pirate.", "1.5", "12"],
            "guided (gamma ",
        ),
        ("best_of_n.py", ["Why is the sky blue?", "3", "12"], "best of "),
        ("watermark.py", ["Write a haiku about rain.", "16"], "watermarked z: "),
        ("few_shot_tree.py", ["2", "4"], "accuracy: "),
        ("graph_of_thought.py", [], "answer: "),
        ("react_agent.py", [], "answer: "),
        ("output_validation.py", ["6"], "valid: "),
        ("jacobi_decoding.py", ["24"], "same tokens: True"),
        ("tree_of_thought.py", ["3 4 5", "35", "2", "1"], "best path (value "),
        ("skeleton_of_thought.py", ["How can I improve my sleep?", "16"], "joined "),
        ("self_consistency.py", ["4"], "majority answer: "),
    ],
)
def test_example_lips_run(server, example, args, expect):
    env = {**os.environ, "SYMPHONY_SOCKET": server}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "symphony.lipctl.cli",
            "run",
            str(ROOT / "examples" / example),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout
    if example == "json_extractor.py":
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("extracted: "))
        person = json.loads(line.removeprefix("extracted: "))
        assert set(person) == {"name", "age", "city"} and isinstance(person["age"], int)
    if example == "watermark.py":  # the detector tells the watermarked text from the plain
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("watermarked z: "))
        marked, plain = (float(part.split(": ")[1]) for part in line.split(", "))
        assert marked > 2.0 > plain
    if example == "output_validation.py":  # every line valid after the retries
        assert "valid: 1.00 of 6 lines" in out.stdout
    if example == "attention_sink_chat.py":  # the context never ran out: every turn answered
        assert out.stdout.count("turn ") == 10
    if example == "agent_calculator.py":
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("calc: "))
        expression, _, value = line.removeprefix("calc: ").rpartition(" = ")
        assert set(expression) <= set("0123456789+-*/(). ")  # what the token mask allows
        expected = eval(expression)  # safe: digits and operators only, checked above
        assert float(value) == pytest.approx(expected)


SPAWNING_CLIENT = textwrap.dedent(
    """
    import sys
    from symphony.lipctl import connect
    program = "import os; print(os.getuid(), os.getgid())"
    with connect(sys.argv[1]) as lip:
        pid = lip.spawn(program, name="whoami.py")
        out, it = b"", lip.wait(pid)
        while True:
            try:
                out += next(it)["data"]
            except StopIteration as stop:
                print(out.decode().strip(), stop.value["exit_status"])
                break
    """
)


def test_a_lip_runs_as_the_uid_that_asked(server):
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    out = run_as_nobody(SPAWNING_CLIENT, server)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(NOBODY), str(NOBODY), "0"]


def test_page_quota_and_rlimits_bind_a_lip(server):
    program = textwrap.dedent(
        """
        from symphony.lipctl import SymphonyError, connect
        with connect() as lip:
            kv = lip.kv("quota.kv", create=True)
            try:
                kv.append(list(range(100, 200)))
            except SymphonyError as exc:
                print(exc.errno, exc.message)
            kv.unlink()
        import resource
        print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        """
    )
    with connect(server) as lip:
        pid = lip.spawn(program, name="quota.py", limits={"pages": 2, "open_files": 64})
        out, status = wait_program(lip, pid)
        assert status == 0
        lines = out.decode().splitlines()
        assert lines[0] == "ENOSPC page quota of 2 pages exceeded"
        assert lines[1] == "64"
        with pytest.raises(SymphonyError) as info:
            lip.spawn("print(1)", limits={"priority": 0, "bogus": 1})
        assert info.value.errno == "EINVAL"
        counted = textwrap.dedent(
            """
            from symphony.lipctl import SymphonyError, connect
            with connect() as lip:
                kv = lip.kv("tokens.kv", create=True)
                kv.append(list(range(100, 108)))
                try:
                    kv.append(list(range(100, 108)))
                except SymphonyError as exc:
                    print(exc.errno)
                kv.unlink()
            """
        )
        pid = lip.spawn(counted, name="tokens.py", limits={"tokens": 12})
        assert wait_program(lip, pid) == (b"EDQUOT\n", 0)
        t0 = time.monotonic()
        pid = lip.spawn(
            "import time; time.sleep(60)", name="sleeper.py", limits={"wall_seconds": 1}
        )
        _, status = wait_program(lip, pid)
        assert status < 0 and time.monotonic() - t0 < 30  # killed at its wall-time limit
        assert next(p for p in lip.ps() if p["pid"] == pid)["state"] == "killed"


def test_the_default_server_runs_int8_weights_its_check_passed(server):
    """`lipctl serve` with no --quant: auto picks int8 on this CPU and says why."""
    env = {**os.environ, "SYMPHONY_SOCKET": server}
    cli = [sys.executable, "-m", "symphony.lipctl.cli", "status"]
    out = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "(float32, int8 weights)" in out.stdout
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("quant "))
    assert "auto chose int8: top-1 1.000" in line
    with connect(server) as lip:
        assert lip.status()["quant"] == "int8"
