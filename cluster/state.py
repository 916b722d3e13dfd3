"""What a Ray cluster is doing, in a few lines, for errors about runs that do not progress; and
the clean-up of a driver that has to end without unwinding its run."""

from __future__ import annotations


def ray_state() -> str:
    """Resources free and in total, placement groups and actors that are not done."""
    import ray
    from ray.util.state import list_actors, list_placement_groups

    if not ray.is_initialized():
        return "Ray is not initialized in this process"
    lines = [f"free: {ray.available_resources()}", f"total: {ray.cluster_resources()}"]
    groups = list_placement_groups(
        filters=[("state", "!=", "REMOVED")], raise_on_missing_output=False, timeout=10
    )
    for pg in groups:
        lines.append(f"placement group {pg.placement_group_id} {pg.state} {pg.bundles}")
    actors = list_actors(
        filters=[("state", "!=", "DEAD")], raise_on_missing_output=False, timeout=10
    )
    for actor in actors:
        lines.append(f"actor {actor.class_name} {actor.state} pid={actor.pid} node={actor.node_id}")
    return "\n".join(lines)


def remove_job_placement_groups() -> int:
    """Remove the placement groups this job created and has not removed; return how many.
    For a driver that must end without unwinding its run: Ray does not always remove a dead
    driver's placement groups (seen: one holding 2 CPUs after its driver exited, which no later
    run could use)."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_placement_groups

    job = ray.get_runtime_context().get_job_id()
    groups = list_placement_groups(
        filters=[("creator_job_id", "=", job), ("state", "!=", "REMOVED")],
        raise_on_missing_output=False,
        timeout=10,
    )
    for group in groups:
        remove_placement_group(
            PlacementGroup(ray.PlacementGroupID.from_hex(group.placement_group_id))
        )
    return len(groups)
