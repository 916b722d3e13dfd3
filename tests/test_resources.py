import pytest

from trainyard.cluster.errors import SpecError
from trainyard.cluster.nodes import AUTOSCALING_CONFIG_ENV, Nodes, addable_nodes
from trainyard.cluster.resources import ScalingSpec, plan_resources


def test_two_workers_on_two_cpus_leave_cpu_for_data():
    plan = plan_resources(ScalingSpec(num_workers=2), Nodes(cpus=(2.0,), gpus=(0.0,)))
    assert plan.cpus_per_worker * 2 < 2
    assert plan.data_cpus >= 0.5 and plan.data_task_cpus <= plan.data_cpus
    assert plan.torch_threads == 1


def test_workers_that_take_every_cpu_are_refused():
    with pytest.raises(SpecError, match="would hang"):
        plan_resources(
            ScalingSpec(num_workers=2, cpus_per_worker=1.0), Nodes(cpus=(2.0,), gpus=(0.0,))
        )


def test_plan_fits_workers_on_nodes():
    # Three 1-CPU nodes: an even split (1.125 CPU) fits on no node, one CPU each does.
    plan = plan_resources(ScalingSpec(num_workers=2), Nodes(cpus=(1.0, 1.0, 1.0), gpus=(0, 0, 0)))
    assert plan.cpus_per_worker == 1.0 and plan.data_cpus == 1.0
    big = plan_resources(ScalingSpec(num_workers=2), Nodes(cpus=(16.0,), gpus=(0.0,)))
    assert big.cpus_per_worker == 6.0 and big.torch_threads == 6 and big.data_cpus == 4.0


def test_an_elastic_run_is_planned_at_the_most_workers_that_fit_and_needs_its_least():
    three = Nodes(cpus=(1.0, 1.0, 1.0), gpus=(0, 0, 0))
    plan = plan_resources(ScalingSpec(num_workers=[1, 3]), three)
    assert (plan.num_workers, plan.elastic, plan.cpus_per_worker) == (3, (1, 3), 0.75)
    assert "1 to 3 worker(s), elastic (3 fit now) × 0.75 CPU" in plan.describe()
    fewer = plan_resources(ScalingSpec(num_workers=[2, 3], cpus_per_worker=1.0), three)
    assert (fewer.num_workers, fewer.starts_with) == (2, 2)  # 3 would leave Ray Data nothing
    with pytest.raises(SpecError, match="scaling.cpus_per_worker: 2 worker"):
        plan_resources(ScalingSpec(num_workers=[2, 3], cpus_per_worker=1.5), three)


def test_workers_that_do_not_fit_a_node_are_refused():
    with pytest.raises(SpecError, match="do not fit on nodes"):
        plan_resources(
            ScalingSpec(num_workers=2, cpus_per_worker=1.5),
            Nodes(cpus=(1.0, 1.0, 1.0, 1.0), gpus=(0, 0, 0, 0)),
        )


def test_gpu_workers_need_gpus():
    with pytest.raises(SpecError, match="need 2 GPU"):
        plan_resources(ScalingSpec(num_workers=2, use_gpu=True), Nodes(cpus=(8.0,), gpus=(1.0,)))
    plan = plan_resources(ScalingSpec(num_workers=2, use_gpu=True), Nodes(cpus=(8.0,), gpus=(2.0,)))
    assert plan.worker_resources() == {"CPU": 1.0, "GPU": 1.0} and plan.data_cpus == 6.0


def test_more_workers_than_the_cpus_allow_are_refused():
    with pytest.raises(SpecError, match="64 worker.* need at least 16 CPUs .* at most 6 worker"):
        plan_resources(ScalingSpec(num_workers=64), Nodes(cpus=(2.0,), gpus=(0.0,)))


def test_gpu_run_waits_for_the_gpu_workers_ray_cluster_yaml_can_add(monkeypatch):
    # ray_cluster.yaml: the head and the two CPU workers that are always up; GPU workers
    # (0 to 2) start on demand.
    monkeypatch.setenv(AUTOSCALING_CONFIG_ENV, "ray_cluster.yaml")
    alive = [{"CPU": 8.0}, {"CPU": 16.0}, {"CPU": 16.0}]
    more = addable_nodes(alive)
    assert sorted(map(str, more)) == sorted(
        map(str, [{"CPU": 16.0}] * 2 + [{"CPU": 4.0, "GPU": 1.0}] * 2)
    )
    nodes = Nodes.of(alive + more, addable=len(more))
    plan = plan_resources(ScalingSpec(num_workers=2, use_gpu=True), nodes)
    assert plan.needs_new_nodes and plan.worker_resources() == {"CPU": 1.0, "GPU": 1.0}
    assert "+ up to 4 node(s) the autoscaler can add: 40 CPUs, 2 GPUs" in plan.describe()
    with pytest.raises(SpecError, match="need 3 GPU"):
        plan_resources(ScalingSpec(num_workers=3, use_gpu=True), nodes)
    # Without the autoscaler's config the same cluster has no GPU.
    with pytest.raises(SpecError, match="need 2 GPU"):
        plan_resources(ScalingSpec(num_workers=2, use_gpu=True), Nodes.of(alive))


def test_custom_resources_must_fit_on_some_node():
    nodes = Nodes.of(
        [{"CPU": 1.0}, {"CPU": 1.0, "fake_gpu": 1.0}, {"CPU": 1.0, "fake_gpu": 1.0}], addable=2
    )
    plan = plan_resources(ScalingSpec(num_workers=2, resources_per_worker={"fake_gpu": 1}), nodes)
    assert plan.needs_new_nodes and plan.worker_resources()["fake_gpu"] == 1
    with pytest.raises(
        SpecError, match="3 worker.* do not fit on the cluster's nodes or those its"
    ):
        plan_resources(ScalingSpec(num_workers=3, resources_per_worker={"fake_gpu": 1}), nodes)
