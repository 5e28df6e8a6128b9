"""The launcher's view of a run's commits: metadata only, never the state itself.

Workers hold the commits (:mod:`.rank.ring`); every ``PULL_INTERVAL_S`` the launcher asks them which
parts they hold (a few hundred bytes through the scheduler) and keeps the newest step that
every rank has committed, so a recovery knows where to go on from and which worker to pull
each part from. It also seals durable checkpoints once every rank has written its file.
"""

from __future__ import annotations

import pickle
import threading
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import CheckpointDir, Meta, Position
from .rank.ring import Entry, Source


@dataclass
class CommitIndex:
    """Which worker holds which part of which step, for one run; the newest consistent one."""

    run_id: str
    world_size: int
    base_world: int
    replicated: bool  # every rank holds the whole state (ddp)
    latest: Meta | None = None  # the newest consistent commit known (or the resumed one)
    attempt: int = 0
    worlds: dict[int, int] = field(default_factory=dict)  # attempt -> its world size
    pulled_bytes: int = 0  # what the pulls moved through the scheduler, request and replies
    pulls: int = 0
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # worker -> ring stats
    _written: dict[int, tuple[Position, set[int], bool]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.worlds[self.attempt] = self.world_size

    @property
    def step(self) -> int:
        return self.latest.step if self.latest else -1

    def reset(self, world_size: int, attempt: int) -> None:
        """A new attempt on ``world_size`` ranks: unsealed files of the old one are dropped."""
        with self._lock:
            self.world_size, self.attempt = world_size, attempt
            self.worlds[attempt] = world_size
            self._written.clear()

    def _consistent(self, entries: dict[str, list[Entry]]) -> tuple[Meta, Source] | None:
        """The newest step every rank of its attempt committed, and a holder of each part."""
        found: dict[tuple[int, int], dict[str, Any]] = {}  # (step, attempt) -> holders
        for worker, held in entries.items():
            for e in held:
                slot = found.setdefault((e.position.steps, e.attempt),
                                        {"ranks": {}, "state": None, "position": e.position})
                slot["ranks"].setdefault(e.rank, worker)
                if e.has_state and (self.replicated or e.rank == 0) and slot["state"] is None:
                    slot["state"] = (worker, e.rank)
        for (step, attempt), slot in sorted(found.items(), reverse=True):
            world = self.worlds.get(attempt)
            if world is None or slot["state"] is None or len(slot["ranks"]) < world:
                continue
            holder, rank = slot["state"]
            meta = Meta(slot["position"], world, self.base_world)
            return meta, Source(step, attempt, world, dict(slot["ranks"]), holder,
                                None if self.replicated else rank)
        return None

    def pull(self, client: Any, workers: list[str], since: int | None = None,
             ) -> tuple[tuple[Meta, Source] | None, list[Meta]]:
        """Ask ``workers`` what they hold; returns the newest consistent commit among what they
        hold (with its sources) and the durable steps that are now complete, oldest first."""
        from .rank.ring import index

        since = self.step if since is None else since
        replies = client.run(index, self.run_id, since, workers=workers, on_error="return")
        replies = {w: r for w, r in replies.items() if isinstance(r, dict)}
        with self._lock:
            self.pulls += 1
            self.pulled_bytes += len(pickle.dumps((index, self.run_id, since, workers))) \
                + len(pickle.dumps(replies))
            best = self._consistent({w: r["entries"] for w, r in replies.items()})
            if best is not None and best[0].step > self.step:
                self.latest = best[0]
            ready: list[Meta] = []
            for worker, reply in replies.items():
                self.stats[worker] = reply["stats"]
                for position, rank, attempt, state in reply["written"]:
                    if attempt != self.attempt:
                        continue
                    slot = self._written.setdefault(position.steps, (position, set(), False))
                    slot[1].add(rank)
                    self._written[position.steps] = (position, slot[1], slot[2] or state)
            for step in sorted(self._written):
                position, ranks, state = self._written[step]
                if state and len(ranks) >= self.world_size:
                    ready.append(Meta(position, self.world_size, self.base_world))
                    del self._written[step]
        return best, ready

    def seal(self, directory: CheckpointDir | None, ready: list[Meta],
             ) -> tuple[list[Meta], list[str]]:
        """Seal the complete durable steps in ``directory``: those sealed, and one sentence
        per failure."""
        sealed, problems = [], []
        for meta in ready:
            if directory is None:
                continue
            try:
                directory.seal(meta)
                sealed.append(meta)
            except OSError as e:
                problems.append(f"checkpoint of step {meta.step} not sealed: {e}")
        return sealed, problems
