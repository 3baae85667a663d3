"""What Ray's worker niceness costs training on a small CPU (BENCHMARKS.md §4).

Ray starts every worker process (actors, tasks, Ray Train's workers) at niceness 15 unless ``RAY_worker_niceness``
says otherwise; its daemons (raylet, GCS, agents) and the driver stay at 0. On a machine whose cores the training
threads fill, every short wake-up of a niceness-0 process then pre-empts a training thread at once, and the other
thread waits at the next OpenMP barrier. This bench trains one epoch of the quickstart's model (convnet at width 0.25,
Fashion-MNIST, batch 256, as many torch threads as cores) in the driver and in a Ray actor, in turns, once on an
embedded Ray started with Ray's default niceness and once with ``RAY_worker_niceness=0``, each in a fresh process,
and reports the actor's epoch over the driver's. (Tried for issue 12, not adopted: no difference on an idle 2-core
machine, nor in the pipeline's epochs.)

    python -m geoprune_ray.bench.worker_niceness                # 3 rounds: default, 0, default, 0, ...
    python -m geoprune_ray.bench.worker_niceness --rounds 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = "--child"


def child() -> None:
    import time

    import ray
    import torch

    from geoprune_ray.core.config import TrainConfig
    from geoprune_ray.core.reference import resolve
    from geoprune_ray.core.train import train

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, train_set, _, card = resolve("convnet", "fashion-mnist", "fashion-mnist", width=0.25)
    cfg = TrainConfig(epochs=1, batch_size=256, lr=0.2, seed=0)
    ray.init(address="local", num_cpus=threads, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0.5)
    class Trainer:
        def epoch(self, data, state) -> dict:
            torch.set_num_threads(threads)
            m = card.build()
            m.load_state_dict(state)
            started = time.perf_counter()
            train(m, data, cfg, "cpu")
            return {"seconds": time.perf_counter() - started, "niceness": os.nice(0)}

    state = model.state_dict()
    trainer = Trainer.remote()
    ray.get(trainer.__ray_ready__.remote())
    m = card.build()
    m.load_state_dict(state)
    started = time.perf_counter()
    train(m, train_set, cfg, "cpu")
    driver = time.perf_counter() - started
    actor = ray.get(trainer.epoch.remote(train_set, state))
    ray.shutdown()
    print(json.dumps({"driver_s": driver, "actor_s": actor["seconds"], "actor_niceness": actor["niceness"],
                      "threads": threads}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"default": [], "0": []}
    for i in range(args.rounds):
        for setting in ("default", "0") if i % 2 == 0 else ("0", "default"):
            env = {k: v for k, v in os.environ.items() if k != "RAY_worker_niceness"}
            if setting != "default":
                env["RAY_worker_niceness"] = setting
            out = subprocess.run([sys.executable, "-m", __spec__.name, CHILD], env=env, capture_output=True, text=True,
                                 check=True).stdout
            run = json.loads(out.strip().splitlines()[-1])
            runs[setting].append(run)
            print(f"round {i + 1}, worker niceness {run['actor_niceness']}: driver {run['driver_s']:.2f} s, "
                  f"actor {run['actor_s']:.2f} s, actor/driver {run['actor_s'] / run['driver_s']:.3f}", flush=True)
    summary = {}
    for setting, rows in runs.items():
        ratio = sum(r["actor_s"] for r in rows) / sum(r["driver_s"] for r in rows)
        summary[setting] = {"niceness": rows[0]["actor_niceness"], "actor_over_driver": ratio,
                            "actor_s_median": statistics.median(r["actor_s"] for r in rows),
                            "driver_s_median": statistics.median(r["driver_s"] for r in rows), "runs": rows}
        print(f"worker niceness {rows[0]['actor_niceness']}: the actor's epoch over the driver's "
              f"(sum over {len(rows)} rounds): {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    child() if CHILD in sys.argv else main()
