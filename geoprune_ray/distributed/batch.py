"""Batches: several job specs run as concurrent pipelines on one Ray cluster, one combined table.

A batch spec names shared ``defaults`` and a list of ``jobs``; each job is a job spec merged over
the defaults (``core.spec.BatchSpec``, validated whole before anything starts: a bad key or value
of any job is one line naming the job and the key's path).
Locally, each pipeline is its own driver process attached to one Ray cluster (the embedded one
the batch starts, or ``--address``), so the pipelines share the cluster's actors, trial slots and
Ray Train workers. Each run directory is ``STORAGE/JOB_NAME``; the batch writes
``batch.json`` (jobs, exit codes, times), ``batch.parquet``, ``batch.md`` and ``plots/batch.png``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ..core.spec import BatchSpec, load_batch
from ..errors import GeopruneError
from ..core.rundir import RunDir

log = logging.getLogger("geoprune_ray")
__all__ = ["BatchSpec", "load_batch", "run_batch"]  # the specs' home is core.spec; kept here for one release


def _pump(name: str, stream, sink) -> None:
    for line in iter(stream.readline, ""):
        sink.write(f"[{name}] {line}")
        sink.flush()


def run_batch(batch: BatchSpec, storage: str, address: Optional[str] = None,
              report: Optional[Callable[[RunDir, dict], Any]] = None,
              job_command: Optional[Callable[[Path, str, str], list[str]]] = None) -> dict[str, Any]:
    """Run every job of ``batch`` concurrently on one cluster; returns batch.json's record.

    Each job runs in a process of its own: ``job_command(spec_file, storage, gcs_address)`` is its command line (the
    CLI passes its own ``run``, which also renders the job's report; both are the app's, above this layer).
    ``report(out, summaries)``, given, renders the combined table of the jobs that finished (the CLI passes
    ``app.report.render_batch``)."""
    if job_command is None:
        raise TypeError("run_batch needs job_command: how to run one job of the batch in a process of its own")
    import ray

    from .cluster import connect, embedded_size
    from .pipeline import Pipeline

    out = RunDir(storage)
    for spec in batch.jobs:  # a folder holding another job's run fails now, not after minutes
        Pipeline(spec, out.uri(spec.name))
        if not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized():
            spec.check_placeable(*embedded_size())
    connect(address)
    gcs = ray.get_runtime_context().gcs_address
    record: dict[str, Any] = {"name": batch.name, "started": time.time(), "jobs": {}}
    with tempfile.TemporaryDirectory(prefix="geoprune-batch-") as tmp:
        procs = {}
        for spec in batch.jobs:
            job_file = Path(tmp) / f"{spec.name}.yaml"
            job_file.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
            cmd = job_command(job_file, out.uri(spec.name), gcs)
            log.info("batch: starting %s", spec.name)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            pump = threading.Thread(target=_pump, args=(spec.name, proc.stdout, sys.stdout), daemon=True)
            pump.start()
            procs[spec.name] = (proc, pump)
        try:
            for name, (proc, pump) in procs.items():
                record["jobs"][name] = {"exit_code": proc.wait()}
                pump.join(timeout=5)
        except KeyboardInterrupt:
            for proc, _ in procs.values():
                proc.terminate()
            raise
    record["finished"] = time.time()
    summaries = {}
    for spec in batch.jobs:
        run = RunDir(out.uri(spec.name))
        job = record["jobs"][spec.name]
        job["run_dir"] = run.location
        if job["exit_code"] == 0 and run.exists("summary.json"):
            summaries[spec.name] = run.read_json("summary.json")
            state = run.read_json("state.json")
            job["stages"] = {k: {"started": v.get("started"), "finished": v.get("finished")}
                             for k, v in state["stages"].items()}
    out.write_json("batch.json", record)
    if summaries and report is not None:
        log.info("batch report: %s", report(out, summaries))
    failed = [n for n, j in record["jobs"].items() if j["exit_code"] != 0]
    if failed:
        raise GeopruneError(f"batch jobs failed: {', '.join(failed)}",
                            "see their lines above; 'geoprune batch' again with the same --storage resumes them")
    return record
