"""A rank's training thread on a core of its own (opt-in: ``mlcloud.train.bind-cores``).

Unbound, the kernel moves a rank's thread between cores as the worker's other threads wake;
on 2 quiet cores, 2 ranks of small steps ran 0-35 % slower than torchrun's. Bound to a core
each, they ran at 0.92-0.97 of torchrun's step time. A bound thread cannot leave a core that
something else keeps busy, though: beside a busy loop, bound ranks of small steps ran 3.1
times slower than torchrun's, the rank whose core is shared holding back the other at every
collective. Neither the thread's own run-queue wait nor the machine's CPU pressure told the
two cases apart reliably in a step or two, so binding is left to the user who knows the
machine is theirs: the Dask config ``mlcloud.train.bind-cores: true``.

The training thread is bound once it has joined the process group: the collective threads
the group started stay free to run on any core (bound with it, they waited for its core, and
ranks ran up to 2.4 times slower than torchrun's); so do Dask's. Threads it starts while
bound inherit its core. Binding happens only when the host's ranks fit the cores the worker
may use, and only on Linux. When the rank ends, the thread and the threads it started get
back the cores they had: the worker's next task on that thread runs unbound.
"""

from __future__ import annotations

import os
import threading


def _threads() -> set[int]:
    return {int(tid) for tid in os.listdir("/proc/self/task")}


class CoreBinding:
    """Binds the calling thread to core ``local_rank`` of those it may use;
    :meth:`release` (on the same thread) undoes it."""

    def __init__(self, local_rank: int, local_world_size: int) -> None:
        self.core: int | None = None  # the core while bound
        self._thread = threading.get_ident()
        self._saved: set[int] | None = None
        self._before: set[int] = set()
        try:
            cpus = sorted(os.sched_getaffinity(0))
            if local_world_size > len(cpus) or not 0 <= local_rank < len(cpus):
                return
            before = _threads()
            os.sched_setaffinity(0, {cpus[local_rank]})
        except (AttributeError, OSError):
            return  # not Linux: stay unbound
        self._saved, self.core, self._before = set(cpus), cpus[local_rank], before

    def release(self) -> None:
        """Give the thread, and the threads it started meanwhile, the cores it had."""
        if self._saved is None or threading.get_ident() != self._thread:
            return
        for tid in [0, *(_threads() - self._before)]:
            try:
                if tid == 0 or os.sched_getaffinity(tid) == {self.core}:
                    os.sched_setaffinity(tid, self._saved)
            except OSError:
                pass  # a thread that ended meanwhile
        self._saved, self.core = None, None
