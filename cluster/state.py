"""What a Ray cluster is doing, in a few lines: for errors about runs that do not progress."""

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
