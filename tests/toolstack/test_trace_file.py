"""``--trace FILE``: Chrome trace-event JSON of a run and of a replayed explorer failure.

The structure check follows the Trace Event Format document (the JSON
object form: ``traceEvents``, ``displayTimeUnit``; duration events ``B``/``E``
nest per thread; async ``b``/``e`` pair by cat and id; flow ``s``/``f``;
instant ``i``; metadata ``M`` ``process_name``/``thread_name``).
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests.toolstack.run_helpers import gntdma_cmd, run_cli, subprocess_env

from gntdma.toolstack.trace import check_trace, check_trace_file


def _valid() -> dict[str, Any]:
    return {"displayTimeUnit": "ms", "traceEvents": [
        {"ph": "B", "name": "xbd_io", "cat": "lock", "pid": 1, "tid": 1, "ts": 1.0},
        {"ph": "B", "name": "gnttab_list", "cat": "lock", "pid": 1, "tid": 1, "ts": 2.0},
        {"ph": "i", "s": "t", "name": "notify port 3", "cat": "evtchn", "pid": 1, "tid": 1,
         "ts": 2.5},
        {"ph": "s", "name": "evtchn", "cat": "evtchn", "id": 7, "pid": 1, "tid": 1, "ts": 2.5},
        {"ph": "E", "name": "gnttab_list", "cat": "lock", "pid": 1, "tid": 1, "ts": 3.0},
        {"ph": "b", "name": "bio read", "cat": "bio", "id": 1, "pid": 1, "tid": 1, "ts": 3.5},
        {"ph": "E", "name": "xbd_io", "cat": "lock", "pid": 1, "tid": 1, "ts": 4.0},
        {"ph": "B", "name": "evtchn port 3", "cat": "evtchn", "pid": 1, "tid": 2, "ts": 5.0},
        {"ph": "f", "bp": "e", "name": "evtchn", "cat": "evtchn", "id": 7, "pid": 1, "tid": 2,
         "ts": 5.0},
        {"ph": "e", "name": "bio read", "cat": "bio", "id": 1, "pid": 1, "tid": 2, "ts": 5.5},
        {"ph": "E", "name": "evtchn port 3", "cat": "evtchn", "pid": 1, "tid": 2, "ts": 6.0},
        {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "guest1"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "io0"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "intr"}},
    ]}


def test_checker_accepts_a_well_formed_trace() -> None:
    assert check_trace(_valid()) == []


def _broken(how: str) -> dict[str, Any]:
    doc = _valid()
    ev: list[dict[str, Any]] = doc["traceEvents"]
    if how == "E never comes":
        del ev[6]
    elif how == "E without B":
        ev.insert(0, {"ph": "E", "name": "x", "cat": "lock", "pid": 1, "tid": 1, "ts": 0.5})
    elif how == "not nested":
        ev[4], ev[6] = ev[6] | {"ts": 3.0}, ev[4] | {"ts": 4.0}
    elif how == "b never ended":
        del ev[9]
    elif how == "e without b":
        del ev[5]
    elif how == "time goes back":
        ev[7]["ts"] = 3.9
    elif how == "flow ends before it starts":
        del ev[3]
    elif how == "flow outside any slice":
        ev.insert(0, {"ph": "s", "name": "evtchn", "cat": "evtchn", "id": 8, "pid": 1,
                      "tid": 1, "ts": 0.5})
    elif how == "thread not named":
        del ev[13]
    elif how == "process not named":
        del ev[11]
    elif how == "flow never finished":
        del ev[8]
    elif how == "flow finished twice":
        ev.insert(9, ev[8] | {})
    elif how == "global instant's pid not named":
        ev.insert(11, {"ph": "i", "s": "g", "name": "replay output", "cat": "trace",
                       "pid": 0, "tid": 0, "ts": 7.0})
    elif how == "no ts":
        del ev[2]["ts"]
    elif how == "tid not an integer":
        ev[0]["tid"] = "1"
    elif how == "unknown phase":
        ev[2]["ph"] = "Q"
    elif how == "no traceEvents":
        return {"events": ev}
    return doc


@pytest.mark.parametrize("how", [
    "E never comes", "E without B", "not nested", "b never ended", "e without b",
    "time goes back", "flow ends before it starts", "flow outside any slice",
    "thread not named", "process not named",
    # toolstack/trace.py check_trace: every s finished once, every pid named (issue 15 review)
    "flow never finished", "flow finished twice", "global instant's pid not named",
    "no ts", "tid not an integer", "unknown phase", "no traceEvents"])
def test_checker_rejects_a_broken_trace(how: str) -> None:
    doc = _broken(how)
    assert doc != _valid() or how == "no traceEvents"
    assert check_trace(copy.deepcopy(doc)) != [], how


def test_checker_rejects_a_file_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_valid())[:-10])
    problems = check_trace_file(path)
    assert len(problems) == 1 and problems[0].startswith("not JSON")


def _load(path: Path) -> tuple[dict[str, Any], dict[tuple[int, int], str],
                                dict[int, str]]:
    doc = json.loads(path.read_text())
    ev = doc["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev
               if e["ph"] == "M" and e["name"] == "thread_name"}
    procs = {e["pid"]: e["args"]["name"] for e in ev
             if e["ph"] == "M" and e["name"] == "process_name"}
    return doc, threads, procs


@pytest.mark.slow
def test_run_trace_has_thread_lock_evtchn_bio_and_deferred_load_events(
        tmp_path: Path) -> None:
    out = tmp_path / "run.trace.json"
    p = subprocess.run(gntdma_cmd("run", "--duration", "1", "--trace", str(out)),
                       cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    assert f"trace: {out}" in p.stdout
    assert check_trace_file(out) == []
    doc, threads, procs = _load(out)
    ev = doc["traceEvents"]
    assert doc["otherData"]["command"] == "run"
    assert doc["otherData"]["limit_reached"] is False
    # One process per domain, one track per kernel thread, each named.
    assert {"Domain-0 (domid 0)", "host"} <= set(procs.values())
    guest = {pid for pid, name in procs.items() if name.startswith("guest1")}
    assert len(guest) == 1
    gthreads = {name for (pid, _t), name in threads.items() if pid in guest}
    assert {"guest1/swi", "guest1/taskqueue"} <= gthreads
    phases = {(e["ph"], e.get("cat")) for e in ev}
    assert {("B", "lock"), ("E", "lock"), ("B", "sleep"), ("i", "evtchn"), ("s", "evtchn"),
            ("f", "evtchn"), ("B", "evtchn"), ("b", "bio"), ("e", "bio"), ("b", "busdma"),
            ("e", "busdma")} <= phases
    # The workload's bios, from creation to biodone, are spans of the guest's process.
    bios = [e for e in ev if e["ph"] == "b" and e["cat"] == "bio"]
    assert {e["name"] for e in bios} >= {"bio read", "bio write"}
    io = [e for e in bios if "/io" in threads[(e["pid"], e["tid"])]]
    assert io and all(e["pid"] in guest for e in io)
    # Every notification of a handled port reaches its handler run (flow s -> f).
    s_ids = {e["id"] for e in ev if e["ph"] == "s"}
    f_ids = {e["id"] for e in ev if e["ph"] == "f"}
    assert f_ids <= s_ids and len(f_ids) > 0


@pytest.mark.slow
def test_replayed_explorer_failure_trace_shows_the_failing_locks(tmp_path: Path) -> None:
    replay = tmp_path / "R.json"
    out = tmp_path / "replay.trace.json"
    env = subprocess_env(tmp_path)
    p = subprocess.run(gntdma_cmd("explore", "gnttab-shortage-blkfront", "--callback-delivery",
                                  "inline", "--out", str(replay)),
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 1, p.stdout + p.stderr
    p = subprocess.run(gntdma_cmd("replay", str(replay), "--trace", str(out)),
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "reproduced" in p.stdout
    assert check_trace_file(out) == []
    doc, threads, procs = _load(out)
    ev = doc["traceEvents"]
    name_of = {(e["pid"], e["tid"]): threads.get((e["pid"], e["tid"])) for e in ev}
    # The seed's failure: the interrupt thread holds xbd_io, then gnttab_list (the free
    # callback runs inline under it) and panics taking xbd_io again; submitters waited
    # for xbd_io on the way.
    intr = [(e["ph"], e["name"]) for e in ev if e["ph"] in "BEi"
            and name_of[(e["pid"], e["tid"])] == "guest1/xbd0-int"]
    panic_at = intr.index(("i", "panic"))
    assert intr[panic_at - 2:panic_at] == [("B", "xbd_io"), ("B", "gnttab_list")]
    panic = next(e for e in ev if e["name"] == "panic")
    assert "recursing on non-recursive mutex xbd_io" in panic["args"]["message"]
    # Held to the end (the thread died holding them): ended by the recorder.
    assert intr[panic_at + 1:] == [("E", "gnttab_list"), ("E", "xbd_io")]
    waits = {name_of[(e["pid"], e["tid"])] for e in ev
             if e["ph"] == "B" and e["name"] == "wait xbd_io"}
    assert waits and all(w is not None and w.startswith("guest1/") for w in waits)
    assert procs[next(iter(e["pid"] for e in ev if e["name"] == "panic"))].startswith("guest1")
    # The replay's outcome is in the file, and virtual timestamps follow the steps.
    note = next(e for e in ev if e["name"] == "replay output")
    assert any("reproduced" in line for line in note["args"]["lines"])
    assert doc["otherData"]["command"] == "replay"


def test_trace_limit_ends_the_trace_and_the_file_says_so(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    replay = tmp_path / "R.json"
    out = tmp_path / "t.json"
    rc, _o, _e = run_cli(capsys, "explore", "gnttab-shortage-blkfront", "--callback-delivery",
                         "inline", "--out", str(replay))
    assert rc == 1
    rc, stdout, _e = run_cli(capsys, "replay", str(replay), "--trace", str(out),
                             "--trace-limit", "50")
    assert rc == 1
    assert "the limit of 50 events was reached" in stdout
    assert check_trace_file(out) == []
    doc, _threads, _procs = _load(out)
    assert doc["otherData"]["limit_reached"] is True
    ev = [e for e in doc["traceEvents"] if e["ph"] != "M"]
    mark = next(i for i, e in enumerate(ev) if e["name"] == "trace limit reached")
    assert mark == 50
    # After the mark only the ends of what was open, and the replay's outcome.
    after = [e for e in ev[mark + 1:] if e["name"] != "replay output"]
    assert len(after) == len(ev) - mark - 2
    assert after and all(e["ph"] in "Ee" and e["args"] == {"unfinished": True} for e in after)


@pytest.mark.parametrize("args, message", [
    (["--trace-limit", "0"], "--trace-limit must be at least 1"),
    (["--trace", "{tmp}/no/such/dir/t.json"], "no such directory"),
    (["--trace", "{tmp}"], "is a directory"),
])
def test_bad_trace_options_are_refused_before_anything_runs(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str],
        message: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--trace" not in args:
        args += ["--trace", str(tmp_path / "t.json")]
    rc, _out, err = run_cli(capsys, "run", "--duration", "0.1", *args)
    assert rc == 2
    assert message in err
    assert list(tmp_path.iterdir()) == []  # no trace file, nothing else either
