"""CPU time of every process on the machine while a command runs, by process name (Linux /proc).

    python -m geoprune_ray.bench.cpu_accounting -- geoprune run JOB.yaml --storage DIR
        # CPU-seconds over the whole run
    python -m geoprune_ray.bench.cpu_accounting --when "stage finetune" --window 15 -- geoprune run JOB.yaml --storage DIR
        # CPU % and context switches per second over 15 s, from the moment the command's output first shows the text

Used for BENCHMARKS.md §4 (the Ray path against one process on 2 cores). Processes are sampled every 0.25 s; a
process that lives less than that is missed, and one that ends between samples loses its last quarter second.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time


def _label(pid: str) -> str:
    args = open(f"/proc/{pid}/cmdline").read().split("\0")
    if args[0].startswith("ray::"):
        return args[0]
    return " ".join(a.rsplit("/", 1)[-1] for a in args[:2] if a)


def snapshot(seen: dict, mine: int) -> None:
    """(pid, start time) → (name, CPU seconds, context switches); a name read once is kept when the process ends."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == mine:
            continue
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            switches = sum(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if "ctxt_switches" in line)
            key = (int(pid), int(fields[19]))
            label = _label(pid)
            if key in seen and (not label or label == "ray::IDLE"):
                label = seen[key][0]
            seen[key] = (label[:60], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), switches)
        except (OSError, ValueError, IndexError):
            continue


def whole_run(command: list[str]) -> None:
    seen: dict = {}
    snapshot(seen, os.getpid())
    before = dict(seen)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.25):
            snapshot(seen, os.getpid())

    sampler = threading.Thread(target=loop, daemon=True)
    sampler.start()
    started = time.time()
    rc = subprocess.call(command)
    wall = time.time() - started
    stop.set()
    sampler.join()
    by_name: dict[str, list[float]] = {}
    for key, (label, cpu, _) in seen.items():
        spent = cpu - before.get(key, (label, 0.0, 0))[1]
        if spent > 0:
            row = by_name.setdefault(label, [0.0, 0])
            row[0] += spent
            row[1] += 1
    total = sum(row[0] for row in by_name.values())
    print(f"exit {rc}; wall {wall:.1f} s, CPU {total:.1f} s (= {total / wall:.2f} cores on average)")
    for label, (cpu, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"  {cpu:7.1f} s  x{count:<3d} {label}")


def window(command: list[str], when: str, seconds: float) -> None:
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while when not in open(log.name).read():
            if proc.poll() is not None:
                sys.exit(f"the command ended before its output showed {when!r}")
            time.sleep(0.25)
        first: dict = {}
        snapshot(first, os.getpid())
        started = time.time()
        time.sleep(seconds)
        last: dict = {}
        snapshot(last, os.getpid())
        span = time.time() - started
        proc.wait()
    rows = sorted(((100 * (last[k][1] - first[k][1]) / span, (last[k][2] - first[k][2]) / span, last[k][0])
                   for k in last if k in first), reverse=True)
    print(f"over {span:.1f} s from {when!r}: {sum(r[0] for r in rows):.0f}% CPU, "
          f"{sum(r[1] for r in rows):.0f} context switches/s")
    for cpu, switches, label in rows[:25]:
        print(f"  {cpu:6.1f}%  {switches:7.0f}/s  {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--when", help="sample a window from the moment the command's output shows this text")
    parser.add_argument("--window", type=float, default=15.0, help="the window's length in seconds (default 15)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    if args.when:
        window(command, args.when, args.window)
    else:
        whole_run(command)


if __name__ == "__main__":
    main()
