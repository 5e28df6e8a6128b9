"""What changes when a run goes on with a different number of ranks (``--elastic RULE``).

``global-batch`` (default): each rank's batch grows by ``base_world / world`` so the global
batch, the steps per epoch and the learning rate stay as launched; a committed position (batch
``b`` of an epoch) means the same global samples in any world. ``linear-lr``: each rank keeps
its batch, so the global batch shrinks with the world; the learning rate is scaled by the same
factor (the linear scaling rule) and the position is mapped to the batch that has consumed the
same number of samples.
"""

from __future__ import annotations

from typing import Any

ELASTIC_RULES = ("global-batch", "linear-lr")


def check_rule(rule: str) -> str:
    """``rule`` if known, else one sentence naming the allowed ones."""
    if rule not in ELASTIC_RULES:
        raise ValueError(f"elastic rule {rule!r} is unknown; allowed: {', '.join(ELASTIC_RULES)}.")
    return rule


def per_rank_batch(rule: str, batch_size: int, base_world: int, world: int) -> int:
    """The batch each rank draws when ``world`` ranks do the work of ``base_world``."""
    if rule == "global-batch" and world != base_world:
        return max(1, round(batch_size * base_world / world))
    return batch_size


def map_batch(rule: str, batch: int, old_world: int, world: int) -> int:
    """A committed batch index of a loop in ``old_world`` as an index in ``world``."""
    if rule == "linear-lr" and world != old_world:
        return batch * old_world // world
    return batch


def rescale_lr(rule: str, optimizers: list[Any], schedulers: list[Any], old_world: int,
               world: int) -> None:
    """Under ``linear-lr``, scale restored learning rates by ``world / old_world``."""
    if rule != "linear-lr" or world == old_world:
        return
    factor = world / old_world
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
    for scheduler in schedulers:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
