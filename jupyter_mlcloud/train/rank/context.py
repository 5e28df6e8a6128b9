"""``ctx``: what user training code sees on each rank."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ...telemetry import events
from ..checkpoint import CommitPlan, Position, Resume
from ..options import CompressionSpec, StrategyOptions
from ..strategies.base import Strategy
from ..strategies.compression import Compression
from . import cancel, elastic, ring
from .sharding import Shard
from .state import check_shapes, set_rng_state

EXAMPLE_ROWS = 5  # rows of rank 0's first input kept as the logged model's input example


class TrainContext:
    """Handed to the training cell (as ``ctx``) or function (as its argument) on every rank.

    ``rank``, ``world_size``, ``local_rank`` and ``device`` say where the code runs;
    ``prepare`` wraps the model for the run's ``--strategy``; ``shard`` gives this rank's
    batches; ``epochs`` counts epochs; ``report`` sends metrics to the live panels.

    With commits on (``--max-failures`` / ``--checkpoint-dir``), a *step* is one batch drawn
    from ``ctx.shard``: before each batch the state registered by ``prepare`` is committed,
    and a resumed attempt skips the epochs, loops and batches already done and restores that
    state just before the batch it stopped at, so the training code needs no restore logic.

    The step boundaries (before each ``ctx.shard`` batch and after its last), each epoch of
    ``ctx.epochs`` and each ``ctx.report`` are the safe points where a cancelled rank stops,
    raising ``RunCancelled`` on its own thread.
    """

    def __init__(
        self,
        *,
        run_id: str,
        rank: int,
        world_size: int,
        local_rank: int,
        device: torch.device,
        seed: int,
        default_epochs: int | None,
        reporter: events.EventBatcher | None,
        commits: CommitPlan | None = None,
        resume: Resume | None = None,
        compression: CompressionSpec | None = None,
        elastic_rule: str = "global-batch",
        base_world: int | None = None,
        attempt: int = 0,
        emit: Callable[[dict[str, Any]], None] | None = None,
        guard: Callable[[], None] | None = None,
        strategy: Strategy | None = None,
    ) -> None:
        self.run_id = run_id
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.seed = seed
        self.epoch = 0
        self.step = 0
        #: The trial's hyperparameters under ``mlc.tune`` (name -> value); empty otherwise.
        self.params: dict[str, Any] = {}
        self._default_epochs = default_epochs
        self._reporter = reporter
        self.attempt = attempt  # 0, then one more after each recovery
        self.base_world = base_world or world_size
        self._strategy = strategy or Strategy(StrategyOptions(), rank, world_size, device)
        self._cache: dict[int, list[torch.Tensor]] = {}
        # What a commit saves and a resume restores, in ``prepare`` order.
        self._models: list[torch.nn.Module] = []
        self._optimizers: list[Any] = []
        self._schedulers: list[Any] = []
        self._compressions: list[Compression] = []
        self._commits, self._resume = commits or CommitPlan(), resume
        self._compression, self._elastic = compression or CompressionSpec(), elastic_rule
        self._emit = emit
        self._guard = guard  # raises RunCancelled when this rank should stop
        self._steps = 0  # batches drawn from ctx.shard in the whole run
        self._loop = -1  # index of the current ctx.shard iteration within the epoch
        self._drawn = False  # a batch of the current loop is in the user's hands
        self._at_target = False  # the current loop is the one the resume stopped in
        self._first_step_pending = False
        self._asked = False  # ctx.checkpoint() was called: commit at the next boundary
        self._bytes_mark = (0, 0, 0)  # (sent, uncompressed, steps) at the last report
        self._example_hook: Any = None  # removed by its first call, else by finish()
        self._reservoir: Any = None  # ctx.keep_reference's sample, on rank 0

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank whose results come back to the notebook."""
        return self.rank == 0

    def prepare(self, model: torch.nn.Module, optimizer: Any = None, scheduler: Any = None,
                *, split: Sequence[str] | None = None, loss_fn: Any = None) -> Any:
        """Move ``model`` to ``ctx.device``, wrap it for the run's ``--strategy``, register state.

        ``model``, ``optimizer`` and ``scheduler`` (an LR scheduler) are what commits save and
        a resume restores, with the RNG states and the data position. Build the optimizer on
        the model's parameters before calling. With ``--compression`` the gradient hook is
        attached here. Returns the model to train with: a ``DistributedDataParallel`` (ddp),
        the sharded module (fsdp), the model itself (ps-sync/ps-async: ``optimizer.step()``
        goes through the parameter server) or a pipeline stage trained with
        ``loss = model.step(inputs, target)`` (pipeline: ``split`` names the submodules that
        start a stage, default an even split by parameter count; ``loss_fn(output, target)``
        is applied on the last stage).
        """
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"ctx.prepare needs a torch.nn.Module, got {type(model).__name__}."
            )
        if (self._commits.every or self._commits.durable_every) and optimizer is None:
            raise ValueError(
                "with --max-failures or --checkpoint-dir, pass the optimizer too"
                " (ctx.prepare(model, optimizer)) so a resume restores it."
            )
        index = len(self._models)
        if self._resume is not None:
            saved = self._resume.state["models"]
            if index >= len(saved):
                raise ValueError(
                    f"the checkpoint holds {len(saved)} model(s) but ctx.prepare was called"
                    f" {index + 1} times; resume with the code that wrote it."
                )
            check_shapes(saved[index], model, index)
        model = model.to(self.device)
        if index == 0 and self.rank == 0 and self.attempt == 0:
            self._send_example(model)
        wrapped = self._strategy.wrap(model, optimizer, split=split, loss_fn=loss_fn)
        self._models.append(model)
        if optimizer is not None:
            self._optimizers.append(optimizer)
        if scheduler is not None:
            self._schedulers.append(scheduler)
        if self._compression.kind != "none":
            self._compressions.append(Compression(self._compression, wrapped))
        return wrapped

    def shard(
        self,
        data: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int | None = None,
        drop_last: bool = False,
        sample_dim: str | None = None,
        variables: Sequence[str] | None = None,
    ) -> Shard:
        """This rank's batches of ``data`` for the current epoch (see :mod:`.sharding`).

        ``data``: a torch ``Dataset``, a tensor or numpy array, a tuple of them (batches come
        as tuples), an xarray ``DataArray``/``Dataset`` (``sample_dim`` names the sample
        dimension, default the first; ``variables`` picks and orders a Dataset's variables),
        or dask arrays. Lazy data is loaded by each rank for its own samples only.
        """
        if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0:
            batch_size = elastic.per_rank_batch(self._elastic, batch_size,
                                                self._data_world(self.base_world),
                                                self._data_world(self.world_size))
        rank, world = self._strategy.data_view()  # pipeline: every stage sees every batch
        return Shard(
            data,
            batch_size,
            rank=rank,
            world_size=world,
            epoch=self.epoch,
            shuffle=shuffle,
            seed=self.seed if seed is None else seed,
            drop_last=drop_last,
            sample_dim=sample_dim,
            variables=variables,
            device=self.device,
            cache=self._cache,
            tracker=self,
        )

    def epochs(self, n: int | None = None) -> Iterator[int]:
        """Yield epoch numbers 0..n-1 (``n`` defaults to ``--epochs``), keeping ``ctx.epoch``."""
        n = self._default_epochs if n is None else n
        if n is None:
            raise ValueError("ctx.epochs() needs a count: pass one, or run with --epochs N.")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"ctx.epochs needs a whole number >= 0, got {n!r}.")
        start = self._resume.position.epoch if self._resume is not None else 0
        for epoch in range(start, n):
            self._safe_point()
            self.epoch = epoch
            self._loop = -1
            yield epoch

    @property
    def report_interval(self) -> float | None:
        """Seconds a reported point may wait to travel with the next ones (None: not sent).

        A point that comes this long after the last send goes at once. ``mlc.tune`` lowers
        it while a pruner judges the trial, so that a hopeless one stops sooner.
        """
        return self._reporter.interval if self._reporter is not None else None

    @report_interval.setter
    def report_interval(self, seconds: float) -> None:
        if self._reporter is not None:
            self._reporter.interval = seconds

    def report(self, step: int | None = None, **values: Any) -> None:
        """Send metrics (numbers or one-element tensors) to the live panels and ``run.metrics``.

        ``step`` defaults to a counter that grows by one per call.
        """
        self._safe_point()
        self.step = self.step + 1 if step is None else int(step)
        if self._compressions:
            values = {**values, **self._bytes_per_step()}
        values = {**values, **self._strategy.metrics()}
        if self._reporter is not None:
            self._reporter.add(events.point(self.rank, self.step, self.epoch, values))

    def keep_reference(self, batch: Any, max_rows: int = 10_000) -> None:
        """Keep a uniform sample (at most ``max_rows`` rows) of the inputs rank 0 trains on:
        the reference that serving and scoring compare later inputs with (``run.reference``;
        logged with the model, so ``mlc.serve("models:/NAME@ALIAS")`` watches for drift
        without being told). Call it with each batch; other ranks keep nothing."""
        if self.rank != 0:
            return
        if self._reservoir is None:
            from ...monitoring.reference import Reservoir

            self._reservoir = Reservoir(max_rows)
        self._reservoir.add(batch)

    def kept_reference(self) -> Any:
        """What :meth:`keep_reference` kept (a ``Reference``), or None."""
        return self._reservoir.reference() if self._reservoir is not None else None

    def checkpoint(self) -> None:
        """Commit at the next step boundary, and write it to ``--checkpoint-dir`` if one is set.

        Use it where a checkpoint matters outside the ``--checkpoint-every`` schedule (the end
        of a validation epoch, say).
        """
        if not (self._commits.every or self._commits.durable_every):
            raise ValueError(
                "ctx.checkpoint() needs --checkpoint-dir PATH (or --max-failures N for"
                " in-memory commits)."
            )
        self._asked = True

    @property
    def committed_step(self) -> int:
        """The newest step whose commit the launcher holds (-1 before the first)."""
        return ring.client_step(self.run_id)

    @property
    def compression(self) -> Compression | None:
        """The gradient-compression hook of the first prepared model (bytes counters, state)."""
        return self._compressions[0] if self._compressions else None

    def release(self) -> None:
        """Drop every reference this context holds to models, optimizers and loaded data."""
        for compression in self._compressions:
            compression.close()
        self._strategy.release()
        for held in (self._models, self._optimizers, self._schedulers, self._compressions):
            held.clear()
        self._cache.clear()
        self._resume = None

    def finish(self) -> Any:
        """After the training code returned, on every rank: bring the results to rank 0."""
        if self._example_hook is not None:  # never called (a pipeline stage ran, not the
            self._example_hook.remove()     # whole model): the model must pickle without it
        self._strategy.finish()

    def export(self, value: Any) -> Any:
        """What the notebook gets for ``value`` (a wrapped model: the whole plain module)."""
        return self._strategy.export(value)

    def check_resumed(self) -> None:
        """After the training code returned: fail if a resume never found its position."""
        if self._resume is not None:
            p = self._resume.position
            raise RuntimeError(
                f"this attempt resumed from step {p.steps} (epoch {p.epoch}, loop {p.loop},"
                f" batch {p.batch}) but the training code never reached it through"
                " ctx.epochs() and ctx.shard(); resuming needs its batches drawn from ctx.shard."
            )

    # ------------------------------------------------------------ steps, commits, resume

    def _bytes_per_step(self) -> dict[str, float]:
        totals = [c.counter.totals() for c in self._compressions]
        sent, full = sum(t[0] for t in totals), sum(t[1] for t in totals)
        last_sent, last_full, last_steps = self._bytes_mark
        self._bytes_mark = (sent, full, self._steps)
        steps = max(1, self._steps - last_steps)
        if full == last_full:
            return {}
        return {"bytes_sent": (sent - last_sent) / steps,
                "bytes_ratio": (sent - last_sent) / (full - last_full)}

    def _loop_start(self) -> int | None:
        """A ``ctx.shard`` iteration begins: how many batches to skip (None: all of them)."""
        self._loop += 1
        self._drawn = False
        self._at_target = False
        if self._resume is None:
            return 0
        p = self._resume.position
        here, target = (self.epoch, self._loop), (p.epoch, p.loop)
        if here < target:
            return None
        if here > target:  # the code changed shape; restore before going on
            self._restore()
            return 0
        self._at_target = True
        return elastic.map_batch(self._elastic, p.batch,
                                 self._data_world(self._resume.world_size),
                                 self._data_world(self.world_size))

    def _before_batch(self, index: int) -> None:
        """Batch ``index`` of the current loop is about to be handed out."""
        self._boundary(index)
        self._drawn = True

    def _loop_end(self, count: int) -> None:
        """The current loop handed out its last batch (``count`` in all)."""
        self._boundary(count)
        self._drawn = False

    def _safe_point(self) -> None:
        if self._guard is not None:
            self._guard()

    def _boundary(self, batch: int) -> None:
        """Position ``batch`` of the current loop: restore there, or end the step before it."""
        self._safe_point()
        if self._at_target and self._resume is not None:
            self._restore()
        elif self._drawn:
            self._step_done(batch)

    def _step_done(self, batch: int) -> None:
        self._steps += 1
        if self._first_step_pending:
            self._first_step_pending = False
            self._event("first step")
        commit, durable = self._commits.due(self._steps)
        stop = cancel.stop_due(self.run_id, self._steps)  # a planned stop: a budget, a hand-over
        if self._asked or (stop and (self._commits.every or self._commits.durable_every)):
            self._asked = False
            commit, durable = True, bool(self._commits.durable_every)
        if commit:
            position = Position(self.epoch, self._loop, batch, self._steps, self.step)
            # Live views: commit() copies them (into recycled buffers) and adds RNG states.
            local = {"hooks": [c.state_dict(copy=False) for c in self._compressions],
                     "slice": self._strategy.commit_slice()}
            ring.commit(self.run_id, self.rank, position, local, self._commit_state(), durable)
        if stop:
            raise cancel.RunCancelled(f"run {self.run_id} stopped as planned at step"
                                      f" {self._steps}.")

    def _commit_state(self) -> dict[str, Any] | None:
        """The whole state for a commit, on the ranks that hold it: every rank where it is
        replicated (ddp), else rank 0 (every rank takes part where gathering it is collective)."""
        if self._strategy.replicated_state:
            return self._state()
        if self.rank == 0 or self._strategy.collective_state:
            state = self._state()
            return state if self.rank == 0 else None
        return None

    def _state(self) -> dict[str, Any]:
        """The registered state, as live views (a commit copies it)."""
        return {
            "models": self._strategy.model_states(self._models),
            "optimizers": self._strategy.optimizer_states(self._optimizers),
            "schedulers": [s.state_dict() for s in self._schedulers],
            "strategy": self._strategy.extra_state(),
        }

    def _data_world(self, world: int) -> int:
        """How many ways a run of ``world`` ranks splits each batch: the elastic rules scale
        with it (1 for a pipeline, whose stages all see every batch)."""
        return world if self._strategy.data_parallel else 1

    def _restore(self) -> None:
        resume, self._resume = self._resume, None
        assert resume is not None
        state = resume.state
        for kind, live in (("optimizers", self._optimizers), ("schedulers", self._schedulers)):
            if len(state[kind]) != len(live):
                raise ValueError(
                    f"the checkpoint holds {len(state[kind])} {kind} but ctx.prepare registered"
                    f" {len(live)}; resume with the code that wrote it."
                )
        self._strategy.load_states(self._models, state["models"], self._optimizers,
                                   state["optimizers"])
        for scheduler, saved in zip(self._schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        elastic.rescale_lr(self._elastic, self._optimizers, self._schedulers,
                           self._data_world(resume.world_size), self._data_world(self.world_size))
        if resume.local is not None:  # None: a rank the committed world did not have
            set_rng_state(resume.local["rng"])
            for compression, saved in zip(self._compressions, resume.local["hooks"],
                                          strict=False):
                compression.load_state_dict(saved)
        self._strategy.restore(state.get("strategy"))
        self._steps, self.step = resume.position.steps, resume.position.report_step
        self._bytes_mark = (*self._bytes_mark[:2], self._steps)
        self._first_step_pending = True
        self._event("restored")

    def _send_example(self, model: torch.nn.Module) -> None:
        """Send the first rows of the model's first input to the notebook, once: the example
        and signature its MLflow model is logged with."""

        def first_input(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            handle.remove()
            x = args[0] if args else None
            if self._emit is None or not isinstance(x, torch.Tensor) or x.dim() == 0:
                return
            rows = x[:EXAMPLE_ROWS].detach().cpu()
            if rows.dtype in (torch.bfloat16, torch.float16):
                rows = rows.float()  # numpy has no bfloat16
            self._emit({"phase": "example", "attempt": self.attempt, "time": time.time(),
                        "example": {"data": rows.tolist(),
                                    "dtype": str(rows.dtype).removeprefix("torch.")}})

        handle = model.register_forward_pre_hook(first_input)
        self._example_hook = handle

    def _event(self, phase: str) -> None:
        if self._emit is not None and self.rank == 0:
            self._emit({"phase": phase, "attempt": self.attempt, "time": time.time(),
                        "step": self._steps})
