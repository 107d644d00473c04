"""Extractor failures (issue 12, deliverable 6): a device or runtime error stops the run (it is not an item
failure), K failures in a row stop it, failed items keep a folder unfinished unless --allow-failures (and
are listed in its manifest), and a lock file refuses a second process on the same shard. Every case: exit
status 2, one `error:` line naming the file/shard/items, no traceback, nothing lost or half-written."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("av")

from extract_tiny import synth_frames, tiny_checkpoint  # noqa: E402

from dff_jax import records  # noqa: E402
from extract.__main__ import main  # noqa: E402
from extract.models import VisionLanguageBackend  # noqa: E402
from extract import ExtractError  # noqa: E402
from extract.run import RunOptions, resolve_options, run  # noqa: E402
from extract.video import write_test_video  # noqa: E402

torch.set_num_threads(2)
GOOD = ["a1", "a2", "a3", "a4", "a5", "a6"]
LOCK = "lock-part-00000-of-00001"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Six small clips, two junk files; items.csv lists the six, mixed.csv two junk items among four clips."""
    d = tmp_path_factory.mktemp("media")
    for i, item in enumerate(GOOD):
        write_test_video(d / f"{item}.mp4", synth_frames(3, 32, 48, seed=i), fps=6)
    for junk in ("j1", "j2"):
        (d / f"{junk}.mp4").write_bytes(b"\x00not a video" * 100)
    (d / "items.csv").write_text("id,title\n" + "".join(f"{i},clip {i}\n" for i in GOOD))
    (d / "mixed.csv").write_text("id,title\n" + "".join(f"{i},clip {i}\n" for i in ["a1", "j1", "a2", "j2"]))
    return d


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))


def cli(media, model, out, *extra, items="items.csv"):
    args = ["--model", model, "--items", str(media / items), "--media", str(media), "--out", str(out)]
    return main([*args, "--frames", "3", "--device", "cpu", "--no-progress", "--decode-workers", "1", *extra])


def one_error(capsys) -> tuple[str, str]:
    """The single `error:` line of a failed command (and its stdout); asserts there is no traceback."""
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    return errors[0], captured.out


def written(out) -> list[str]:
    return sorted(i for p in records.shard_files(out) for i, _ in map(records.decode_item, records.iter_records(p)))


def failures(out) -> dict:
    path = out / "failures-part-00000-of-00001.jsonl"
    if not path.exists():
        return {}
    return {r["item_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def nothing_half_written(out):
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))  # no open parts, no lock leftovers
    assert not (out / LOCK).exists()


def fail_on(monkeypatch, exc, when):
    """Makes the model forward raise `exc` for batches holding an item for which `when(item_id)` is true."""
    original = VisionLanguageBackend.forward

    def forward(self, prepared, pool):
        if any(when(s.item.item_id) for s in prepared.samples):
            raise exc
        return original(self, prepared, pool)

    monkeypatch.setattr(VisionLanguageBackend, "forward", forward)


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported"),
        MemoryError(),
    ],
    ids=["oom", "cuda-error", "host-memory"],
)
def test_a_device_failure_stops_the_run_and_keeps_the_finished_items(media, qwen, tmp_path, capsys, monkeypatch, exc):
    out = tmp_path / "feat"
    fail_on(monkeypatch, exc, lambda i: i in ("a3", "a4"))
    assert cli(media, qwen, out, "--batch-size", "2", "--flush-every", "1") == 2
    error, _ = one_error(capsys)
    assert "a3, a4" in error and type(exc).__name__ in error and "--device cpu" in error
    assert "rerun the same command to resume" in error and "lower --batch-size 2" in error
    assert written(out) == ["a1", "a2"]  # the batch before the failure was flushed
    assert failures(out) == {}  # not recorded as item failures: no zero rows for a broken device
    assert json.loads((out / "manifest-part-00000-of-00001.json").read_text())["status"].startswith("stopped: ")
    assert not (out / records.SCHEMA_FILE).exists()
    nothing_half_written(out)
    if isinstance(exc, torch.OutOfMemoryError):  # the device recovered: the same command resumes
        monkeypatch.undo()
        assert cli(media, qwen, out, "--batch-size", "2") == 0
        assert "4 extracted, 0 failed, 2 already done" in capsys.readouterr().out
        assert written(out) == GOOD and records.read_schema(out).num_items == 6


def test_k_items_failing_in_a_row_stop_the_run(media, qwen, tmp_path, capsys, monkeypatch):
    out = tmp_path / "feat"
    fail_on(monkeypatch, ValueError("the processor output has no video grid"), lambda i: i != "a1")
    assert cli(media, qwen, out, "--max-consecutive-failures", "3") == 2
    error, _ = one_error(capsys)
    assert "failures-part-00000-of-00001.jsonl: 3 items in a row failed, the last a4" in error
    assert "ValueError: the processor output has no video grid" in error and "--max-consecutive-failures 0" in error
    assert written(out) == ["a1"] and sorted(failures(out)) == ["a2", "a3", "a4"]
    assert not (out / records.SCHEMA_FILE).exists()
    nothing_half_written(out)
    # 0 turns the check off: every item is tried, the failures are recorded, the folder is not finalised.
    assert cli(media, qwen, out, "--max-consecutive-failures", "0") == 2
    error, stdout = one_error(capsys)
    assert "0 extracted, 5 failed, 1 already done" in stdout and "5 item(s) failed: a2 (model: ValueError" in error
    assert sorted(failures(out)) == ["a2", "a3", "a4", "a5", "a6"]
    with pytest.raises(ExtractError, match="--max-consecutive-failures must be >= 0"):
        resolve_options(RunOptions(items="x", out="y", model="m", modality="title", max_consecutive_failures=-1))


def test_one_bad_item_is_a_failure_the_folder_is_finalised_only_by_flag(media, qwen, tmp_path, capsys, monkeypatch):
    out = tmp_path / "feat"
    fail_on(monkeypatch, ValueError("bad item"), lambda i: i == "a2")
    assert cli(media, qwen, out, "--batch-size", "3", items="mixed.csv") == 2
    error, stdout = one_error(capsys)
    assert "folder not finalised (failed items)" in stdout
    assert f"{out}: 3 item(s) failed: j1 (decode: cannot open" in error and "a2 (model: ValueError: bad item)" in error
    assert "--allow-failures" in error and "features.allow_missing=True" in error
    assert written(out) == ["a1"] and not (out / records.SCHEMA_FILE).exists()
    nothing_half_written(out)
    # The merge tool says the same and finalises only when asked; the manifest then lists the failed items.
    from extract.merge import main as merge_main

    assert merge_main(["--out", str(out)]) == 1
    assert "INCOMPLETE: " in capsys.readouterr().out and not (out / records.SCHEMA_FILE).exists()
    assert merge_main(["--out", str(out), "--allow-failures"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["items_written"] == 1 and manifest["allow_failures"]
    assert {f["item_id"]: f["stage"] for f in manifest["failed_items"]} == {
        "j1": "decode",
        "a2": "model",
        "j2": "decode",
    }
    assert records.read_schema(out).num_items == 1
    # A rerun without the flag that writes more items (a2 recovers) but still has failures removes the
    # now-stale schema: a folder without schema.json is never mistaken for a feature set.
    monkeypatch.undo()
    assert cli(media, qwen, out, items="mixed.csv") == 2
    error, _ = one_error(capsys)
    assert "2 item(s) failed: j1" in error and written(out) == ["a1", "a2"]
    assert not (out / records.SCHEMA_FILE).exists() and not (out / "manifest.json").exists()
    assert cli(media, qwen, out, "--allow-failures", items="mixed.csv") == 0
    capsys.readouterr()
    from dff_jax.features import load_features

    table = load_features(out, ["", "a1", "j1", "a2", "j2"], allow_missing=True)
    assert table.missing == 2 and records.read_schema(out).extra["failed_items"] == 2


def test_a_second_process_on_the_same_shard_is_refused(media, qwen, tmp_path, capsys):
    out = tmp_path / "feat"
    seen = []

    def second_process(n):
        if not seen:  # while the first run holds the shard
            assert (out / LOCK).exists()
            seen.append(cli(media, qwen, out))
            seen.append(one_error(capsys)[0])

    options = RunOptions(
        items=str(media / "items.csv"), out=str(out), model=qwen, media=str(media), frames=3, device="cpu"
    )
    options.progress, options.batch_size = False, 2
    manifest = run(options, on_batch=second_process)
    code, error = seen
    assert code == 2 and f"{out / LOCK}: shard 0/1 is already being extracted" in error
    assert f"pid {os.getpid()} on host {socket.gethostname()!r}" in error
    assert manifest["folder_complete"] and written(out) == GOOD  # the first run was not disturbed
    nothing_half_written(out)


def _lock(out, host, pid):
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01T00:00:00+0000"}))


def test_a_stale_lock_is_taken_over_and_a_foreign_one_refused(media, qwen, tmp_path, capsys):
    out = tmp_path / "feat"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock(out, socket.gethostname(), dead.pid)
    assert cli(media, qwen, out, "--batch-size", "3") == 0
    err = capsys.readouterr().err
    assert f"note: {out / LOCK}: taking over the stale lock of pid {dead.pid}" in err
    assert written(out) == GOOD
    nothing_half_written(out)

    other = tmp_path / "other"
    _lock(other, "gpu-node-7", 4242)
    (other / "part-00000-of-00001-000000.tfrecord.tmp").write_bytes(b"the other host's open part")
    assert cli(media, qwen, other) == 2
    error, _ = one_error(capsys)
    assert f"{other / LOCK}: shard 0/1 is held by pid 4242 on host 'gpu-node-7'" in error
    assert "delete the file and rerun" in error
    # Nothing of the holder's was touched: its open part and its lock are still there.
    assert (other / "part-00000-of-00001-000000.tfrecord.tmp").exists() and (other / LOCK).exists()
    (other / LOCK).write_text("garbage")
    assert cli(media, qwen, other) == 2
    assert "not a shard lock this extractor wrote" in one_error(capsys)[0]


def test_a_live_run_with_another_shard_count_is_refused(media, qwen, tmp_path, capsys):
    # --shard 0/1 and 0/2 at once both extracted every item of the overlap: each written twice, folder unmergeable.
    out = tmp_path / "feat"
    out.mkdir()
    (out / "lock-part-00001-of-00002").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    assert cli(media, qwen, out) == 2
    error, _ = one_error(capsys)
    assert "lock-part-00001-of-00002: a process" in error and "another shard count than --shard I/1" in error
    assert written(out) == [] and not (out / LOCK).exists()  # refused before any item, its own lock released
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a stale lock of another count (a killed run) does not stand in the way
    (out / "lock-part-00001-of-00002").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    assert cli(media, qwen, out) == 0 and written(out) == GOOD


def test_the_lock_is_removed_on_sigterm(media, qwen, tmp_path):
    out = tmp_path / "feat"

    def terminate(n):
        os.kill(os.getpid(), signal.SIGTERM)

    options = RunOptions(
        items=str(media / "items.csv"), out=str(out), model=qwen, media=str(media), frames=3, device="cpu"
    )
    options.progress, options.batch_size, options.flush_every = False, 2, 1
    with pytest.raises(KeyboardInterrupt):
        run(options, on_batch=terminate)
    assert written(out) == ["a1", "a2"] and not (out / LOCK).exists()
    assert json.loads((out / "manifest-part-00000-of-00001.json").read_text())["status"] == "interrupted"


RACER = """
import sys
from extract import ExtractError
from extract.lock import ShardLock
try:
    lock = ShardLock(sys.argv[1], (0, 1)).acquire()
except ExtractError as e:
    print("refused", e)
    sys.exit(0)
print("got", flush=True)
sys.stdin.read()  # hold the lock until the test closes stdin (after the others were refused)
lock.release()
"""


def test_processes_racing_for_one_shard_lock_get_it_exactly_once(tmp_path):
    import time

    path = tmp_path / LOCK
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    deadline = time.time() + 60
    while sum(p.poll() is not None for p in procs) < 3 and time.time() < deadline:
        time.sleep(0.05)
    outputs = [p.communicate(input="", timeout=60)[0] for p in procs]
    assert sorted(o.split()[0] for o in outputs) == ["got", "refused", "refused", "refused"], outputs
    assert all("is already being extracted" in o for o in outputs if o.startswith("refused"))
    assert not path.exists() and not list(tmp_path.iterdir())


def test_non_finite_or_huge_hidden_states_are_the_items_failure(media, qwen, tmp_path, capsys, monkeypatch):
    # The folder used to be finalised with them; every training run on it then stopped at load.
    original = VisionLanguageBackend.forward

    def forward(self, prepared, pool):
        out = original(self, prepared, pool).clone()  # an inference tensor cannot be written in place
        for k, s in enumerate(prepared.samples):
            if s.item.item_id == "a2":
                out[k][1, 0] = float("inf")
            if s.item.item_id == "a3":
                out[k][0, 0] = 70000.0  # finite in float32, Inf in float16
        return out

    monkeypatch.setattr(VisionLanguageBackend, "forward", forward)
    out = tmp_path / "feat"
    assert cli(media, qwen, out, "--dtype", "float16", "--batch-size", "3") == 2
    error, _ = one_error(capsys)
    assert "2 item(s) failed" in error
    reasons = {k: v["reason"] for k, v in failures(out).items()}
    assert sorted(reasons) == ["a2", "a3"] and all(failures(out)[k]["stage"] == "model" for k in reasons)
    assert "row 1 hold NaN or Inf stored as float16" in reasons["a2"] and "use --dtype bfloat16" in reasons["a3"]
    assert "a2" not in written(out) and "a3" not in written(out)
    from extract.models import storage_problem

    assert storage_problem(torch.full((2, 3), 70000.0), "bfloat16") is None  # bfloat16 keeps float32's range
    assert "|x| up to 2.1e+06" in storage_problem(torch.full((2, 3), 2.1e6), "float32")


def test_every_item_failing_with_allow_failures_is_an_error(media, qwen, tmp_path, capsys):
    (media / "junk.csv").write_text("id,title\nj1,x\nj2,y\n")
    out = tmp_path / "feat"
    assert cli(media, qwen, out, "--allow-failures", items="junk.csv") == 2
    error, stdout = one_error(capsys)
    assert "folder not finalised (no item written)" in stdout and "other shards pending" not in stdout
    assert f"{out}: all 2 item(s) failed (j1 (decode: cannot open" in error and "nothing to finalise" in error
    assert not (out / records.SCHEMA_FILE).exists()
    nothing_half_written(out)


def test_a_torn_failures_line_from_a_killed_run_is_cut_before_the_resume_appends(media, qwen, tmp_path, capsys):
    # A kill -9 mid-write leaves an unterminated line; appending after it used to bury it mid-file, after which
    # every run and merge refused the folder ("line 3: not a failure record").
    out = tmp_path / "feat"
    assert cli(media, qwen, out, items="mixed.csv") == 2
    path = out / "failures-part-00000-of-00001.jsonl"
    with open(path, "a") as f:
        f.write('{"item_id": "j1", "sta')
    capsys.readouterr()
    assert cli(media, qwen, out, "--allow-failures", items="mixed.csv") == 0
    assert "dropping an unterminated last line" in capsys.readouterr().out
    assert set(failures(out)) == {"j1", "j2"} and path.read_text().endswith("\n")
    assert written(out) == ["a1", "a2"] and records.read_schema(out).extra["failed_items"] == 2
