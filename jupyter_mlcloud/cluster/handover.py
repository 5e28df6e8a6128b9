"""A worker about to retire first lets the tasks that can hand over do so.

Dask retires a worker (``Client.retire_workers``, a graceful close after SIGTERM or a cloud's
preemption notice, an adaptive scale-down) without waiting for the tasks it is running: they
are simply lost. :class:`HandOver`, a scheduler plugin, puts one step before that: when the
workers to retire run tasks whose keys start with one of its ``prefixes`` (a training run's
ranks), it publishes ``{"worker": address, "grace": seconds}`` on the scheduler's
:data:`TOPIC` and gives those tasks up to ``grace`` seconds to end (a run commits one same
step on every rank and stops), then retires the workers as Dask would have.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

NAME = "mlcloud-hand-over"
TOPIC = "mlcloud-retiring"
GRACE_S = 20.0  # default: under the 30 s most platforms allow between SIGTERM and SIGKILL
POLL_S = 0.05


class HandOver(SchedulerPlugin):
    """Wraps the scheduler's ``retire_workers`` handler (see the module)."""

    name = NAME

    def __init__(self, prefixes: tuple[str, ...], grace: float = GRACE_S) -> None:
        self.prefixes, self.grace = tuple(prefixes), float(grace)

    async def start(self, scheduler: Any) -> None:
        if hasattr(scheduler, "_mlcloud_retire_workers"):
            return  # wrapped already: the wrapper asks whichever HandOver is registered now
        original = scheduler._mlcloud_retire_workers = scheduler.handlers["retire_workers"]

        async def retire_workers(workers: Any = None, *, names: Any = None,
                                 **kwargs: Any) -> Any:
            plugin = scheduler.plugins.get(NAME)
            if isinstance(plugin, HandOver):
                await plugin.hand_over(scheduler, _addresses(scheduler, workers, names))
            return await original(workers=workers, names=names, **kwargs)

        scheduler.handlers["retire_workers"] = retire_workers

    def _hosting(self, scheduler: Any, address: str) -> bool:
        ws = scheduler.workers.get(address)
        return ws is not None and any(str(ts.key).startswith(self.prefixes)
                                      for ts in ws.processing)

    async def hand_over(self, scheduler: Any, addresses: list[str]) -> None:
        """Tell the listeners which of ``addresses`` run tasks that hand over, and wait until
        those tasks ended or ``grace`` passed."""
        busy = [a for a in addresses if self._hosting(scheduler, a)]
        if not busy:
            return
        for address in busy:
            scheduler.log_event(TOPIC, {"worker": address, "grace": self.grace})
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(self._hosting(scheduler, a) for a in busy):
            await asyncio.sleep(POLL_S)


def _addresses(scheduler: Any, workers: Any, names: Any) -> list[str]:
    """The addresses a ``retire_workers`` call names (none when it asks for a count)."""
    if names is not None:
        by_name = {str(ws.name): address for address, ws in scheduler.workers.items()}
        return [by_name[str(n)] for n in names if str(n) in by_name]
    return [str(w) for w in workers or ()]


def grace_setting() -> float:
    """The Dask config ``mlcloud.preemption.grace``: seconds a retiring worker's tasks get to
    hand over (default 20). ValueError, in one sentence, for a bad value."""
    import dask

    grace = dask.config.get("mlcloud.preemption.grace", GRACE_S)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
        raise ValueError(f"mlcloud.preemption.grace must be a number of seconds >= 0, got"
                         f" {grace!r}.")
    return float(grace)


def install(client: Any, prefixes: tuple[str, ...], grace: float = GRACE_S) -> None:
    """Register :class:`HandOver` on ``client``'s scheduler (again when the setting changes)."""
    key = (tuple(prefixes), float(grace))
    if getattr(client, "_mlcloud_hand_over", None) != key:
        client.register_plugin(HandOver(prefixes, grace), name=NAME)
        client._mlcloud_hand_over = key
