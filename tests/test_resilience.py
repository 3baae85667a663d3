"""Runs that survive what users do to them (issue 13), with real drivers (``geoprune`` processes) on digits:

- a driver killed (SIGKILL) at each stage's start and end, mid Tune set-up and mid fine-tune resumes to the same τ,
  r* and arms as a run that was never interrupted;
- SIGINT and SIGTERM in the probes, the sensitivity and the tune stages exit 130 with one line saying how to resume,
  and leave no process of the embedded Ray behind; a second Ctrl-C exits at once; after kill -9, the watchdog ends
  what the driver's Ray left;
- one driver per run directory.

The drivers stop at exact points through ``GEOPRUNE_FAILPOINT`` (``distributed.guard.failpoint``): SIGKILL, or the
signal a user would send, sent by the driver to itself at that point.
"""

import json
import os
import re
import subprocess
import sys
import time

import psutil
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from conftest import pipeline_job
from geoprune_ray.app.cli import main
from geoprune_ray.distributed.guard import RunLock, descendants, started_at

RESUME_POINTS = ["tune:start", "search:start", "search:end", "controller:end", "arms:end", "finetune:epoch",
                 "speed:start", "artifacts:start"]


def _driver(argv, log_path, failpoint=None, err_path=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("GEOPRUNE_FAILPOINT", None)
    if failpoint:
        env["GEOPRUNE_FAILPOINT"] = failpoint
    out = open(log_path, "w")
    err = open(err_path, "w") if err_path else subprocess.STDOUT
    return subprocess.Popen([sys.executable, "-m", "geoprune_ray.app.cli", *argv], stdout=out, stderr=err, env=env)


def _alive(pids: dict[int, float]) -> list[int]:
    """The processes of ``pids`` (PID → start time) still running (a zombie has ended)."""
    return [pid for pid, start in pids.items() if started_at(pid) == start]


def _wait_noting_descendants(proc: subprocess.Popen, timeout: float) -> tuple[int, dict[int, float]]:
    """Wait for ``proc``, noting every process that ran under it (its embedded Ray's); ``_NAMES`` gets their names."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for pid, start in descendants(proc.pid).items():
            seen.setdefault(pid, start)
            _NAMES[pid] = _name(pid) or _NAMES.get(pid, "")  # the latest: a process just forked is still "python"
        time.sleep(0.2)
    return proc.wait(timeout=5), seen


_NAMES: dict[int, str] = {}


def _gone_within(pids: dict[int, float], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_a_driver_killed_at_any_point_resumes_to_the_same_result(full_run, digits_weights, tmp_path):
    _, uninterrupted = full_run
    job = tmp_path / "job.yaml"
    spec = pipeline_job(digits_weights, ["adaptive", "uniform"], "digits-kills")
    spec["protocol"]["speed"] = True  # killed at speed:start too
    job.write_text(yaml.safe_dump(spec))
    storage = tmp_path / "run"
    address = ray.get_runtime_context().gcs_address
    logs = []
    for i, point in enumerate([*RESUME_POINTS, None]):
        argv = (["run", str(job), "--storage", str(storage)] if i == 0 else ["resume", str(storage)])
        log_path = tmp_path / f"driver{i}.log"
        proc = _driver([*argv, "--address", address], log_path, f"{point}:kill" if point else None)
        code = proc.wait(timeout=300)
        logs.append(log_path.read_text())
        assert code == (-9 if point else 0), (point, logs[-1][-3000:])
        if point:
            assert f"fault point {point}: kill" in logs[-1]
    assert "probes: 8/8 probes done" in logs[2] and "sensitivity (5 groups): " in logs[2]  # live progress
    assert re.search(r"fine-tune (adaptive|uniform): epoch 1/2, .*ETA", logs[5])
    for text in logs:  # the run's own lines, not Tune's console box and result paths
        assert "Configuration for experiment" not in text and "View detailed results here" not in text
    # the experiment killed while Tune set it up (tuner.pkl without its state) is started again, not retried for ever
    assert "cannot be restored" in logs[1] and "starting it again from the run's recorded stages" in logs[1]
    assert "restoring the Tune experiment" in logs[-1]  # …and later ones are restored

    summary = json.loads((storage / "summary.json").read_text())
    assert summary["tau"] == pytest.approx(uninterrupted["tau"], abs=1e-9)
    assert summary["controller"]["r_star"] == uninterrupted["controller"]["r_star"]
    expected = {row["arm"]: row for row in uninterrupted["arms"]}
    for row in summary["arms"]:  # the same arms table: what was pruned and measured before fine-tuning, exactly
        for key in ("r", "macs_m", "params_m", "delta_g"):
            assert row[key] == pytest.approx(expected[row["arm"]][key], abs=1e-9), (row["arm"], key)
        assert row["top1"] == pytest.approx(expected[row["arm"]]["top1"], abs=2.0)
    steps = pq.read_table(storage / "trials.parquet").to_pandas().query("kind == 'step'")
    assert steps["step"].is_unique  # no controller step was measured twice
    trajectory = [(s["r"], s["delta_g"], s["accepted"]) for s in summary["controller"]["steps"]]
    assert trajectory == [(s["r"], s["delta_g"], s["accepted"]) for s in uninterrupted["controller"]["steps"]]
    # resumed runs never train what a finished stage holds: the search ran until it was recorded, then never again
    searched = [i for i, text in enumerate(logs) if "stage search:" in text]
    assert searched == [1, 2]  # at its start, then at its end (recorded): never again
    timed = [i for i, text in enumerate(logs) if "stage speed:" in text]
    assert timed == [6, 7] and summary["speed"]["measured"]  # killed as it began, then timed once and recorded


@pytest.mark.parametrize("stage,failpoint", [
    ("probes", "search:start:sigint"),  # the probes and the sensitivity tasks in flight
    ("sensitivity", "probes:end:sigterm"),  # the probes are in, the sensitivity tasks may still run
    ("tune", "controller:end:sigint"),  # in the Tune experiment, its fine-tunes starting
])
def test_a_signal_stops_the_run_with_130_one_line_and_no_ray_process_left(stage, failpoint, digits_weights,
                                                                         tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(pipeline_job(digits_weights, ["adaptive"], f"digits-{stage}")))
    storage = tmp_path / "run"
    proc = _driver(["run", str(job), "--storage", str(storage)], tmp_path / "out.log", failpoint,
                   err_path=tmp_path / "err.log")
    code, seen = _wait_noting_descendants(proc, 240)
    out, err = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert code == 130, (out[-3000:], err)
    assert f"fault point {failpoint.rpartition(':')[0]}" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geoprune: interrupted"), err
    assert f"resume with: geoprune resume {storage}" in lines[0]
    assert seen and not _gone_within(seen, 10)  # the embedded Ray was shut down with the driver
    assert not (storage / "summary.json").exists() and (storage / "state.json").exists()


def test_kill_9_leaves_no_ray_process_and_a_second_ctrl_c_exits_at_once(tmp_path):
    job = tmp_path / "job.yaml"
    spec = pipeline_job(None, ["adaptive"], "digits-hard")
    del spec["model"]["weights"]  # the run trains its baseline
    spec["protocol"]["baseline_epochs"] = 1
    job.write_text(yaml.safe_dump(spec))
    storage = tmp_path / "run"
    # kill -9 of the driver once the baseline is recorded: no process of its Ray is alive 60 s later
    proc = _driver(["run", str(job), "--storage", str(storage)], tmp_path / "out.log", "baseline:end:kill")
    code, seen = _wait_noting_descendants(proc, 240)
    assert code == -9, (tmp_path / "out.log").read_text()[-3000:]
    assert {"raylet", "gcs_server"} <= {_NAMES[pid] for pid in seen}  # its embedded Ray was seen…
    assert not _gone_within(seen, 60)  # …and is gone
    assert (storage / "baseline.pt").exists()
    # Ctrl-C twice in the resumed run: the first asks Tune to stop gracefully, the second exits there and then
    proc = _driver(["resume", str(storage)], tmp_path / "out2.log", "search:start:sigint2",
                   err_path=tmp_path / "err.log")
    code, seen = _wait_noting_descendants(proc, 240)
    err = (tmp_path / "err.log").read_text()
    assert code == 130 and err.strip().splitlines() == [
        f"geoprune: interrupted again (SIGINT): stopped at once; resume with: geoprune resume {storage}"], err
    assert "stage baseline: training" not in (tmp_path / "out2.log").read_text()  # read back, not trained again
    assert not _gone_within(seen, 60)  # no shutdown ran: the watchdog ended the embedded Ray


def _name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return ""


def test_one_driver_per_run_directory(ray_cluster, digits_weights, tmp_path, capsys, caplog):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(pipeline_job(digits_weights, ["adaptive"], "digits-locked")))
    storage = tmp_path / "run"
    storage.mkdir()
    holder = RunLock(str(storage), str(storage)).acquire()  # a driver holds the folder
    try:
        code = main(["run", str(job), "--storage", str(storage), "--address", ray.get_runtime_context().gcs_address])
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is in use by another geoprune driver" in err, err
    assert f"pid {os.getpid()}" in err
    assert sorted(p.name for p in storage.iterdir()) == [".geoprune.lock"]  # nothing else was written
    # a lock left by a driver that died is taken over, saying so
    dead = subprocess.run([sys.executable, "-c", "import os; from geoprune_ray.distributed.guard import RunLock; "
                           f"RunLock({str(storage)!r}, {str(storage)!r}).acquire(); os.kill(os.getpid(), 9)"])
    assert dead.returncode == -9
    with caplog.at_level("INFO", logger="geoprune_ray"):
        RunLock(str(storage), str(storage)).acquire().release()
    assert any("taking over" in r.getMessage() and "no longer running" in r.getMessage() for r in caplog.records)
