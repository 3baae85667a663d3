"""``geoprune submit / status / stop``: job specs sent to a Ray cluster through the Ray Jobs API.

The address is the dashboard URL (``http://127.0.0.1:8265`` once ``ray dashboard cluster.yaml``
forwards it), not the GCS address ``run`` takes. With token authentication on (``RAY_AUTH_MODE=token``),
Ray's client finds the token in ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``.
The job's working directory holds only the job spec (and a local weights file it names), so
nothing else of the client's disk is uploaded; ``--pip`` also ships this package's code and pins
its dependencies to the client's versions.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import yaml

from ..errors import GeopruneError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
PINNED = ("torch", "torchvision", "torch-pruning", "pyarrow", "numpy", "scikit-learn", "pyyaml", "matplotlib")


def dashboard_address(address: Optional[str]) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise GeopruneError("no Ray dashboard address", "pass --address http://HOST:8265 or set RAY_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise GeopruneError(f"--address {address} is not a dashboard URL",
                            "submit/status/stop take the dashboard URL, e.g. http://127.0.0.1:8265 "
                            "('ray dashboard cluster.yaml' forwards it); 'run --address' takes host:6379")
    url = urlparse(address)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as exc:
        raise GeopruneError(f"cannot reach the Ray dashboard at {address}: {exc.strerror or exc}",
                            "start the cluster, or forward its dashboard with 'ray dashboard cluster.yaml'") from None
    return address.rstrip("/")


def client(address: Optional[str]):
    """A ``JobSubmissionClient`` for the dashboard at ``address`` (its URL is the client's ``url``)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    token = auth_token()
    try:
        jobs = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"} if token else None)
        jobs.url = url
        return jobs
    except AuthenticationError as exc:
        raise GeopruneError(f"the Ray cluster at {url} refused us: {str(exc).splitlines()[0]}",
                            "set RAY_AUTH_TOKEN, or put the token in ~/.ray/auth_token ('ray get-auth-token' on "
                            "the head prints it)") from None
    except (ConnectionError, RuntimeError) as exc:
        raise GeopruneError(f"cannot use the Ray Jobs API at {url}: {str(exc).splitlines()[0]}",
                            "check the dashboard URL and that the cluster runs ray[default]") from None


def auth_token() -> Optional[str]:
    """The cluster token, where Ray's own client looks for it: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token. Sent as a bearer header even when this shell has no RAY_AUTH_MODE=token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _stage(job: Path, workdir: Path) -> str:
    """Copy the job spec (and a local weights file it names) into ``workdir``; returns the job's name."""
    from .spec import load_spec

    spec = load_spec(job)  # validated here: bad input fails before anything is sent
    data = spec.to_dict()
    weights = data["model"].get("weights")
    if weights and "://" not in weights:
        if not Path(weights).is_file():
            raise GeopruneError(f"model.weights {weights} does not exist", "fix the path in the job spec")
        shutil.copy(weights, workdir / Path(weights).name)
        data["model"]["weights"] = Path(weights).name
    (workdir / "job.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return spec.name


def runtime_env(workdir: Path, pip: bool) -> dict[str, Any]:
    env: dict[str, Any] = {"working_dir": str(workdir)}
    if pip:
        import geoprune_ray

        env["py_modules"] = [str(Path(geoprune_ray.__file__).parent)]
        env["pip"] = [f"{name}=={metadata.version(name)}" for name in PINNED if _installed(name)]
    return env


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def submit_one(jobs_client, job: str | Path, storage: Optional[str], pip: bool) -> tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix="geoprune-submit-") as tmp:
        name = _stage(Path(job), Path(tmp))
        storage = storage or f"~/geoprune-runs/{name}"
        entrypoint = (f"python -m geoprune_ray.app.cli run job.yaml --storage "
                      f"{storage if storage.startswith('~/') else shlex.quote(storage)}")
        job_id = jobs_client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(Path(tmp), pip),
                                        metadata={"geoprune": name, "storage": storage})
    return job_id, storage


def submit(job: str, address: Optional[str], storage: Optional[str], pip: bool = False, follow: bool = False) -> int:
    jobs = client(address)
    job_id, storage = submit_one(jobs, job, storage, pip)
    print(f"submitted {job_id}; run directory: {storage} (as the cluster sees it)")
    print(f"follow: geoprune status {job_id} --address {jobs.url}")
    if not follow:
        return 0
    return _follow(jobs, job_id)


def _follow(jobs, job_id: str) -> int:
    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception:  # the log stream can close early: the job's status below is what counts
        pass
    info = wait(jobs, [job_id])[job_id]
    print(f"job {job_id}: {info.status}")
    return _exit_code(info)


def _exit_code(info) -> int:
    if str(info.status) == "SUCCEEDED":
        return 0
    return 2 if getattr(info, "driver_exit_code", None) == 2 else 1


def wait(jobs, job_ids: list[str], poll: float = 2.0) -> dict[str, Any]:
    infos: dict[str, Any] = {}
    while True:
        for job_id in job_ids:
            infos[job_id] = jobs.get_job_info(job_id)
        if all(str(i.status) in TERMINAL for i in infos.values()):
            return infos
        time.sleep(poll)


def status(address: Optional[str], job_id: Optional[str]) -> int:
    jobs = client(address)
    if job_id:
        info = _info(jobs, job_id)
        print(f"{job_id}: {info.status}" + (f" ({info.message.splitlines()[0]})" if info.message else ""))
        return 0
    rows = sorted(jobs.list_jobs(), key=lambda i: i.start_time or 0)
    for info in rows:
        meta = info.metadata or {}
        print(f"{info.submission_id or info.job_id}  {str(info.status):<9}  {meta.get('geoprune', '-'):<20}  "
              f"{meta.get('storage', '')}")
    if not rows:
        print("no jobs")
    return 0


def stop(address: Optional[str], job_id: str) -> int:
    jobs = client(address)
    _info(jobs, job_id)
    jobs.stop_job(job_id)
    print(f"stopping {job_id}")
    return 0


def _info(jobs, job_id: str):
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as exc:
        raise GeopruneError(f"no job {job_id} on this cluster: {str(exc).splitlines()[0]}",
                            "list the jobs with 'geoprune status'") from None


def submit_batch(batch, storage: str, address: Optional[str], follow: bool = True) -> int:
    """Submit every job of a batch; wait for them; write the combined table where the client can read it."""
    from ..core.rundir import RunDir
    from .report import render_batch

    jobs = client(address)
    submitted = {}
    with tempfile.TemporaryDirectory(prefix="geoprune-batch-") as tmp:
        for spec in batch.jobs:
            job_file = Path(tmp) / f"{spec.name}.yaml"
            job_file.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
            submitted[spec.name], where = submit_one(jobs, job_file, f"{storage.rstrip('/')}/{spec.name}", False)
            print(f"submitted {spec.name}: {submitted[spec.name]} → {where}")
    infos = wait(jobs, list(submitted.values()))
    for name, job_id in submitted.items():
        print(f"{name}: {infos[job_id].status}")
    out = RunDir(storage)
    done = {n: RunDir(out.uri(n)).read_json("summary.json") for n in submitted
            if str(infos[submitted[n]].status) == "SUCCEEDED" and RunDir(out.uri(n)).exists("summary.json")}
    if done:
        out.write_json("batch.json", {"name": batch.name, "jobs": {
            n: {"job_id": j, "status": str(infos[j].status), "run_dir": out.uri(n),
                "exit_code": 0 if n in done else 1} for n, j in submitted.items()}})
        print(f"wrote {render_batch(out, done)}")
    return 0 if len(done) == len(submitted) else 1
