"""How a run shares a node's CPUs and GPUs: the baseline's workers, the probe actors, the fine-tunes."""

import pytest

from geoprune_ray.core.spec import ResourceSpec
from geoprune_ray.distributed.resources import baseline_scaling, gpu_shares, sensitivity_tasks
from geoprune_ray.distributed.scaling import Scaling
from geoprune_ray.errors import GeopruneError


def test_a_cpu_baseline_takes_what_is_free():
    cpu = Scaling(1, False, 0.5)
    assert baseline_scaling(cpu, 2, 2, 0.0).cpus_per_worker == 2  # an idle 2-core node: all of it
    assert baseline_scaling(cpu, 0, 2, 0.0).cpus_per_worker == 0.5  # another baseline holds it: wait for a turn
    assert baseline_scaling(Scaling(2, False, 1.0), 16, 16, 0.0).cpus_per_worker == 8  # split between workers


def test_gpu_baselines_of_a_batch_train_side_by_side():
    gpu = Scaling(1, True, 1.0, 1.0)
    # A 4-GPU, 16-CPU workstation: each baseline gets one GPU and its 4 CPUs, so four can train at once.
    first = baseline_scaling(gpu, 16, 16, 4.0)
    assert (first.cpus_per_worker, first.gpus_per_worker) == (4, 1.0)
    assert baseline_scaling(gpu, 16 - 4, 16, 4.0).cpus_per_worker == 4
    assert baseline_scaling(gpu, 16 - 3 * 4, 16, 4.0).cpus_per_worker == 4
    assert baseline_scaling(gpu, 16, 16, 16.0).cpus_per_worker == 16  # one GPU: the whole node
    # One GPU whose other half the probe actors starting beside it hold: the baseline asks for what they leave (a whole
    # GPU would never come free while they live).
    assert baseline_scaling(Scaling(1, True, 1.0, 0.5), 16, 16, 16.0).gpus_per_worker == 0.5


def test_probe_actors_leave_gpu_for_fine_tuning():
    assert gpu_shares(ResourceSpec(), 0) == (0.0, 0.0, 0.0)
    assert gpu_shares(ResourceSpec(probe_actors=4), 1) == (0.125, 0.5, 0.125)  # half the GPU for the actors
    # Several GPUs: a share just over half a GPU, so Ray cannot pack two actors onto one (it places fractions
    # best-fit: four actors of 0.25 would all land on GPU 0); training takes GPUs without an actor, else the rest of
    # one; a sensitivity task fits twice in that rest (a task asking for an actor's share would find no GPU with it).
    assert gpu_shares(ResourceSpec(probe_actors=4), 4) == pytest.approx((0.5312, 0.4688, 0.2344))
    assert gpu_shares(ResourceSpec(probe_actors=4), 8) == pytest.approx((0.5312, 1.0, 0.2344))
    per_actor, per_worker, task = gpu_shares(ResourceSpec(probe_actors=4), 2)  # two actors per GPU, not three
    assert 2 * per_actor < 1 < 3 * per_actor and 0 < per_worker <= 1 - 2 * per_actor and 2 * task <= per_worker
    assert gpu_shares(ResourceSpec(probe_actors=4, gpus_per_actor=0.25), 4) == (0.25, 1.0, 0.25)  # the spec's kept
    with pytest.raises(GeopruneError, match="leaving none for fine-tuning"):
        gpu_shares(ResourceSpec(probe_actors=4, gpus_per_actor=0.25), 1)


def test_sensitivity_tasks_fit_the_cores_the_actors_leave():
    assert sensitivity_tasks(5, 2, gpu=True) == 3  # one per two groups
    assert sensitivity_tasks(5, 2, gpu=False, node_cpus=2) == 1  # 2 cores, both busy with the actors' probes
    assert sensitivity_tasks(5, 2, gpu=False, node_cpus=16) == 3
    assert sensitivity_tasks(12, 4, gpu=False, node_cpus=8) == 4
    assert sensitivity_tasks(1, 2, gpu=False, node_cpus=64) == 1


def test_early_fine_tunes_fit_beside_the_actors_and_leave_the_steps_room():
    from geoprune_ray.distributed.resources import Resources, prelaunch
    from geoprune_ray.distributed.probes import PoolSpec

    cpu = Scaling(1, False, 0.5)
    res = Resources({"CPU": 2.0}, False, 0.0, 0.0, cpu)
    pool = PoolSpec(2, 0.25, 0.0)
    assert prelaunch(res, pool, cpu, 2, free_cpus=1.5) == 1  # on CPUs one at most (memory)
    assert prelaunch(res, pool, cpu, 2, free_cpus=0.6) == 0  # 0.5 would leave the steps less than a quarter CPU
    one_gpu = Scaling(1, True, 1.0, 0.5)
    res = Resources({"CPU": 16.0, "GPU": 1.0}, True, 0.25, 0.5, one_gpu)
    assert prelaunch(res, PoolSpec(2, 0.25, 0.25), Scaling(1, True, 1.0, 0.25), 4, free_cpus=15.5) == 2  # 0.5 GPU left
    four = Resources({"CPU": 16.0, "GPU": 4.0}, True, 0.5312, 0.4688, one_gpu)
    assert prelaunch(four, PoolSpec(4, 0.25, 0.5312), Scaling(1, True, 1.0, 1.0), 4, free_cpus=15.0) == 0  # no free GPU
    eight = Resources({"CPU": 16.0, "GPU": 8.0}, True, 0.5312, 1.0, one_gpu)
    assert prelaunch(eight, PoolSpec(4, 0.25, 0.5312), Scaling(1, True, 1.0, 1.0), 4, free_cpus=15.0) == 4


def test_the_speed_stage_waits_a_moment_for_ended_work_to_free_its_cpus(ray_cluster):
    """The timing task is sized by the CPUs free; an actor killed just before holds its CPU a moment longer in Ray's
    view. settled_free_cpus waits for what was asked, and gives up with what is free after its wait."""
    import ray

    from geoprune_ray.distributed.resources import settled_free_cpus

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self) -> bool:
            return True

    before = ray.available_resources().get("CPU", 0.0)
    holder = Holder.remote()
    ray.get(holder.ready.remote())
    assert settled_free_cpus(before, wait_s=0.0) == before - 1  # no wait: the CPU is still held
    ray.kill(holder)
    assert settled_free_cpus(before, wait_s=10.0) == before
    assert settled_free_cpus(before + 1, wait_s=0.5) == before  # more than there is: what is free, after the wait
