"""The commit ring of one worker, driven by hand: its own commits and a peer's buddy copies that
arrive late or not at all, as a busy machine makes them."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from jupyter_mlcloud.train.checkpoint import Part, Position
from jupyter_mlcloud.train.commits import CommitIndex
from jupyter_mlcloud.train.rank import ring

RUN = "anchor-test"


@pytest.fixture
def model() -> Iterator[torch.nn.Linear]:
    ring.open_ring(RUN, attempt=0, config=ring.Config())
    yield torch.nn.Linear(4, 3)
    ring.close_ring(RUN)


def own_commit(model: torch.nn.Linear, step: int) -> None:
    """Rank 0 of a DDP run commits its whole state at ``step`` (its weights all equal ``step``)."""
    with torch.no_grad():
        model.weight.fill_(step)
    ring.commit(RUN, 0, Position(steps=step), {"hooks": [step]},
                {"models": [model.state_dict()]})


def copy_arrives(*steps: int) -> None:
    """Rank 1's buddy copies of ``steps`` arrive in one message: their per-rank parts only
    (DDP replicates the rest), as the peer's sender puts them."""
    parts = [ring._wire_part(Part(1, Position(steps=step), {"hooks": [step]}, None, False, 0),
                             with_state=False) for step in steps]
    assert ring._handle_put(RUN, parts)["status"] == "OK"


def survivor_resumes_from() -> int | None:
    """The step the launcher would go on from if rank 1's worker died now (this worker alone
    left), after restoring it here as a new rank would; None: from the start."""
    index = CommitIndex(RUN, world_size=2, base_world=2, replicated=True)
    best = index._consistent({"w0": ring.index(RUN, since=-1)["entries"]})
    if best is None:
        return None
    _, source = best
    state, locals_ = ring.fetch(RUN, source, worker=None)  # all held here: nothing to pull
    assert {rank: local["hooks"] for rank, local in locals_.items()} == \
        {0: [source.step], 1: [source.step]}
    assert (state["models"][0]["weight"] == source.step).all()  # the whole state of that step
    return source.step


def test_copies_that_lag_behind_the_ring_still_leave_a_step_to_go_on_from(
        model: torch.nn.Linear) -> None:
    own_commit(model, 1)
    own_commit(model, 2)
    copy_arrives(2)
    for step in range(3, 8):
        own_commit(model, step)
    # The peer's sender skipped ahead and fell behind: copies of 3 and 4 arrive while this
    # rank's ring already holds the whole state of 6 and 7 only.
    copy_arrives(3)
    copy_arrives(4)
    with ring.held(RUN) as held:
        assert [p.position.steps for p in held.full] == [6, 7]
        assert [p.position.steps for p in held.copies[1]] == [3, 4]
    assert survivor_resumes_from() == 2  # the anchored step: its copy and its whole state

    copy_arrives(7)
    own_commit(model, 8)
    own_commit(model, 9)
    assert survivor_resumes_from() == 7  # anchored as it arrived; 8 and 9 did not recycle it
    with ring.held(RUN) as held:  # the older anchor is let go
        kept = {p.position.steps for p in ring._anchored(held)}
    assert kept == {7}


def test_a_copy_ahead_of_this_rank_is_anchored_when_this_rank_commits_its_step(
        model: torch.nn.Linear) -> None:
    own_commit(model, 1)
    copy_arrives(1)
    copy_arrives(2)  # the peer is a step ahead
    own_commit(model, 2)
    for step in range(3, 6):
        own_commit(model, step)
    assert survivor_resumes_from() == 2


def test_without_copies_nothing_is_anchored_and_per_rank_parts_outlive_the_state(
        model: torch.nn.Linear) -> None:
    for step in range(1, 6):
        own_commit(model, step)
    assert survivor_resumes_from() is None  # no copy of rank 1: no step to go on from
    entries = ring.index(RUN, since=-1)["entries"]
    assert sorted((e.position.steps, e.has_state) for e in entries) == [
        (1, False), (2, False), (3, False), (4, True), (5, True)]


def test_a_late_message_of_small_parts_brings_the_steps_this_ring_still_holds(
        model: torch.nn.Linear) -> None:
    for step in range(1, 6):
        own_commit(model, step)
    # The peer's sender was held up for 4 steps; its queued parts come together.
    copy_arrives(1, 2, 3, 4, 5)
    with ring.held(RUN) as held:
        assert [p.position.steps for p in held.copies[1]] == [4, 5]
    assert survivor_resumes_from() == 5


def test_the_sender_queues_every_small_part_and_only_the_newest_whole_one() -> None:
    sender = ring._Sender()
    sender._thread = threading.current_thread()  # alive: nothing is sent, the queue is read
    small, whole = ring.Config(send_state=False), ring.Config(send_state=True)

    def offer(step: int, config: ring.Config, state: dict[str, int] | None) -> None:
        sender.offer("queue-test", Part(0, Position(steps=step), {}, state), config)

    for step in range(1, ring.RING_PARTS + 4):
        offer(step, small, {"whole": step})  # DDP: the state stays home
    assert [p.position.steps for _, p, _ in sender._pending] == \
        list(range(4, ring.RING_PARTS + 4))  # the newest RING_PARTS, in order
    offer(50, whole, {"whole": 50})
    offer(51, whole, {"whole": 51})
    assert [p.position.steps for _, p, _ in sender._pending] == [51]
