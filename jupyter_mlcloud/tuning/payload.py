"""What a trial ships to its workers: the training code with the trial's values on ``ctx``.

Runs on the workers; imports nothing heavy (the worker has torch loaded already).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


class WithParams:
    """``fn`` with ``ctx.params`` set to one trial's values before it runs.

    ``report_interval``: the longest a reported point waits to be sent (``ctx``'s default
    when None); short while a pruner judges the points.
    ``__wrapped__`` makes ``inspect.signature`` see ``fn``'s own parameters, so ``mlc.train``
    checks keywords against them as it does for ``fn`` itself.
    """

    def __init__(self, fn: Callable[..., Any], params: Mapping[str, Any],
                 report_interval: float | None = None) -> None:
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", "fn")
        self.params = dict(params)
        self.report_interval = report_interval

    def __call__(self, ctx: Any, *args: Any, **kwargs: Any) -> Any:
        ctx.params = dict(self.params)
        if self.report_interval is not None:
            ctx.report_interval = self.report_interval
        return self.__wrapped__(ctx, *args, **kwargs)


class CellFunction:
    """A ``%%tune`` cell as a function of ``ctx``: the cell runs with the notebook names it
    uses, ``ctx``, and ``params`` (the same mapping as ``ctx.params``)."""

    def __init__(self, payload: Any) -> None:
        self.payload = payload  # a train.rank.worker.CellPayload
        self.__name__ = "cell"

    def __call__(self, ctx: Any) -> Any:
        namespace = {**self.payload.namespace, "params": ctx.params}
        return dataclasses.replace(self.payload, namespace=namespace).run(ctx, [])
