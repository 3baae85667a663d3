"""What idle Ray actors cost a training process on a small CPU: training steps timed alone, with N idle actors alive,
and with N actors parked (blocked inside a call, as the pipeline's probe actors wait beside the baseline), in turns
(BENCHMARKS.md §4). An idle Ray actor wakes its main thread about 100 times a second, a parked one about once; with as
many training threads as cores, each wake-up can stall an OpenMP barrier.

    python -m geoprune_ray.bench.idle_actors               # 8 idle actors, 4 rounds of 60 steps each way, 2 threads
    python -m geoprune_ray.bench.idle_actors --actors 4 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import time

import ray
import torch

from geoprune_ray.core.models import build_model


@ray.remote(num_cpus=0)
class Idle:
    def ping(self) -> int:
        return 1

    def park(self, gate) -> int:
        return ray.get(gate.wait.remote())  # blocked in ray.get: no task loop polling for signals


@ray.remote(num_cpus=0)
class Gate:
    def __init__(self) -> None:
        import asyncio

        self.opened = asyncio.Event()

    async def wait(self) -> int:
        await self.opened.wait()
        return 1

    async def open(self) -> None:
        self.opened.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("convnet", 10, 1, 0.25)  # the quickstart's model, at its batch size
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))

    def timed() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return time.perf_counter() - wall, time.process_time() - cpu

    timed()  # warm-up
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs: dict[str, list] = {"alone": [], "idle_actors": [], "parked_actors": []}
    gate = None
    for _ in range(args.rounds):
        runs["alone"].append(timed())
        for mode in ("idle_actors", "parked_actors"):
            actors = [Idle.remote() for _ in range(args.actors)]
            ray.get([a.ping.remote() for a in actors])
            if mode == "parked_actors":
                gate = Gate.remote()  # one more actor, as the pipeline's progress board is there anyway
                parked = [a.park.remote(gate) for a in actors]
            time.sleep(2)
            runs[mode].append(timed())
            if mode == "parked_actors":
                ray.get(gate.open.remote())
                ray.get(parked)
                ray.kill(gate)
            for a in actors:
                ray.kill(a)
            time.sleep(2)
    mean = {k: [sum(r[i] for r in v) / len(v) for i in (0, 1)] for k, v in runs.items()}
    (alone_wall, alone_cpu), (with_wall, with_cpu), (parked_wall, parked_cpu) = (
        mean["alone"], mean["idle_actors"], mean["parked_actors"])
    print(json.dumps({"actors": args.actors, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
                      "alone_wall_s": round(alone_wall, 2), "with_actors_wall_s": round(with_wall, 2),
                      "with_parked_actors_wall_s": round(parked_wall, 2),
                      "slowdown": round(with_wall / alone_wall, 3), "slowdown_parked": round(parked_wall / alone_wall, 3),
                      "alone_cpu_s": round(alone_cpu, 2), "with_actors_cpu_s": round(with_cpu, 2),
                      "with_parked_actors_cpu_s": round(parked_cpu, 2)}))


if __name__ == "__main__":
    main()
