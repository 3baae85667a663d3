"""`geoprune submit` against a real Ray head (`ray start --head` on 127.0.0.1, token authentication on),
started here with its own temp dir and ports and stopped by its PID (never `ray stop`)."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import pipeline_job

PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
         "ray-client-server-port", "runtime-env-agent-port", "metrics-export-port")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this Python runs the jobs
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return {**env, **extra}


@pytest.fixture(scope="module")
def ray_head():
    """A private head: its own temp dir (short: socket paths are length-limited) and free ports."""
    token = secrets.token_hex(32)
    temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    ports = {name: _free_port() for name in PORTS}
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--temp-dir={temp}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", "--min-worker-port=0", "--max-worker-port=0",
           "--object-store-memory=200000000", "--disable-usage-stats",
           *[f"--{name}={port}" for name, port in ports.items()]]
    log = open(Path(temp) / "ray_start.log", "w")
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # really bind 127.0.0.1, not the host's routable address
               DASHBOARD_METRIC_PORT=str(_free_port()), AUTOSCALER_METRIC_PORT=str(_free_port()),
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # SIGTERM stops at once, no 30 s drain
    head = subprocess.Popen(cmd, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, (Path(temp) / "ray_start.log").read_text()[-3000:]
            try:
                JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"}).list_jobs()
                break
            except Exception:
                assert time.monotonic() < deadline, "the head's Jobs API never answered"
                time.sleep(0.5)
        yield url, token
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` takes its raylet, GCS and dashboard down with it
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of this session that outlived it
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _geoprune(*args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "geoprune_ray.app.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_submit_reaches_succeeded_with_the_artifacts_of_a_local_run(ray_head, full_run, digits_weights, tmp_path):
    url, token = ray_head
    job = pipeline_job(digits_weights, ["adaptive"], "digits-submitted")
    job["protocol"]["finetune_epochs"] = 1
    local, local_summary = full_run  # the same kind of job run locally: the same artifacts
    job["protocol"]["probe_accuracy"] = local_summary["job"]["protocol"]["probe_accuracy"]  # its plots too
    job["protocol"]["speed"] = local_summary["job"]["protocol"]["speed"]  # and its speed plots (issue 15)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    storage = tmp_path / "run"
    env = _env(RAY_AUTH_TOKEN=token, HOME=str(tmp_path))
    done = _geoprune("submit", str(tmp_path / "job.yaml"), "--address", url, "--storage", str(storage), "--follow",
                     env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = done.stdout.split("submitted ", 1)[1].split(";", 1)[0]
    assert f"job {job_id}: SUCCEEDED" in done.stdout
    status = _geoprune("status", job_id, "--address", url, env=env, timeout=60)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    listing = _geoprune("status", "--address", url, env=env, timeout=60)
    assert job_id in listing.stdout and "digits-submitted" in listing.stdout

    def names(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.parts[len(root.parts)] not in ("train", "tune"))
    assert names(storage) == names(local)
    assert {"summary.json", "probes.parquet", "trials.parquet", "sensitivity.parquet", "report.md"} <= set(names(storage))


def test_a_cluster_with_token_auth_refuses_a_client_without_the_token(ray_head, tmp_path):
    url, _ = ray_head
    (tmp_path / "job.yaml").write_text("name: x\ndata: {name: digits}\n")
    for env in (_env(HOME=str(tmp_path)), _env(HOME=str(tmp_path), RAY_AUTH_TOKEN="0" * 64)):
        done = _geoprune("submit", str(tmp_path / "job.yaml"), "--address", url, env=env, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert "refused" in lines[0] and "RAY_AUTH_TOKEN" in lines[0] and "Traceback" not in done.stderr


def test_status_and_stop_of_an_unknown_job(ray_head, tmp_path):
    url, token = ray_head
    env = _env(RAY_AUTH_TOKEN=token, HOME=str(tmp_path))
    for command in ("status", "stop"):
        done = _geoprune(command, "raysubmit_nosuchjob", "--address", url, env=env, timeout=120)
        assert done.returncode == 2 and "no job raysubmit_nosuchjob" in done.stderr, done.stderr
