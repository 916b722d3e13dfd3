import pytest

from cluster.resources import Nodes, plan_resources
from pipelines.spec import ScalingSpec, SpecError


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
