"""IPython magics: argument parsing only; every action is a call into the Python API."""

from __future__ import annotations

import argparse
import ast
import shlex
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class
from IPython.display import display

from . import clusters
from .flags import add_score_options

SUBCOMMANDS = ("up", "status", "scale", "adapt", "down", "connect")


class _Parser(argparse.ArgumentParser):
    """argparse that reports problems as one ``UsageError`` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}. See `{self.prog} --help`.")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        # --help already printed; stop the magic without a SystemExit traceback.
        raise UsageError(message.strip() if message else "") if status else _HelpShown()


class _HelpShown(Exception):
    pass


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    return value


def _build_parser() -> _Parser:
    parser = _Parser(prog="%mlcloud", description="Start and manage Dask clusters.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    sub.required = True

    p = sub.add_parser("up", help="start a cluster (GPU-aware) or attach to one")
    p.add_argument("--workers", type=_int, help="number of workers")
    p.add_argument("--threads-per-worker", type=_int, help="threads per worker (1)")
    p.add_argument("--memory-limit", help="per worker: 'auto', '4GiB', bytes or a fraction")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="gpu", action="store_const", const=True,
                        help="insist on GPU workers (one per GPU)")
    device.add_argument("--cpu", dest="gpu", action="store_const", const=False,
                        help="CPU worker processes even when GPUs are present")
    p.add_argument("--name", help="cluster name (default cluster-N)")
    p.add_argument("--adapt", metavar="MIN:MAX", help="adaptive scaling between MIN and MAX")
    p.add_argument("--tls", action="store_true", help="secure with Security.temporary()")
    p.add_argument("--address", help="attach to the scheduler at this address instead")
    p.add_argument("--scheduler-file", help="attach to the scheduler in this file instead")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (10)")

    sub.add_parser("status", help="table of clusters")

    p = sub.add_parser("scale", help="scale to N workers")
    p.add_argument("n", type=_int, metavar="N")
    p.add_argument("--name", help="cluster (default: the current one)")

    p = sub.add_parser("adapt", help="adaptive scaling between MIN and MAX workers")
    p.add_argument("minimum", type=_int, metavar="MIN")
    p.add_argument("maximum", type=_int, metavar="MAX")
    p.add_argument("--name", help="cluster (default: the current one)")

    p = sub.add_parser("down", help="shut down the current cluster")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--name", help="shut down this cluster instead")
    which.add_argument("--all", action="store_true", help="every cluster of this kernel")

    p = sub.add_parser("connect", help="attach to a running cluster")
    p.add_argument("address", help="scheduler address, scheduler file or discovered name")
    p.add_argument("--name", help="name to use here")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (10)")
    return parser


def _build_train_parser() -> _Parser:
    p = _Parser(prog="%%distributed_train",
                description="Run the cell data-parallel on the cluster's workers (ctx is given).")
    p.add_argument("--workers", type=_int, help="ranks, one per worker (default: every free one)")
    p.add_argument("--cluster", help="cluster name (default: the current one)")
    p.add_argument("--backend", help="gloo or nccl (default: nccl on GPUs, else gloo)")
    p.add_argument("--seed", type=_int, default=0, help="seed for python, numpy, torch (0)")
    p.add_argument("--out", default="", help="comma-separated names to bring back from rank 0")
    p.add_argument("--noblock", action="store_true", help="return a Run at once")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds for the rendezvous and each collective (300)")
    p.add_argument("--epochs", type=_int, help="default count for ctx.epochs()")
    p.add_argument("--strategy", default="ddp",
                   help="how the model is distributed: ddp, fsdp, pipeline, ps-sync, ps-async"
                        " (ddp)")
    p.add_argument("--microbatches", type=_int, help="pipeline: microbatches per batch (4)")
    p.add_argument("--pipeline-schedule", default="1f1b",
                   help="pipeline: 1f1b or gpipe (1f1b)")
    p.add_argument("--ps-workers", type=_int, help="ps-*: parameter-server shards (1)")
    p.add_argument("--max-staleness", type=_int,
                   help="ps-async: most pushes a trainer may run ahead of the slowest")
    p.add_argument("--compression", default="none",
                   help="gradient compression: none, fp16, bf16, powersgd[:RANK[:START]] (none)")
    p.add_argument("--max-failures", type=_int, default=0,
                   help="lost workers to survive by resuming from the last commit (0)")
    p.add_argument("--min-workers", type=_int,
                   help="go on with this many workers if no replacement comes")
    p.add_argument("--commit-every", type=_int, default=1,
                   help="steps between in-memory commits (1)")
    p.add_argument("--elastic", default="global-batch",
                   help="rule when the world shrinks: global-batch or linear-lr (global-batch)")
    p.add_argument("--checkpoint-dir", help="fsspec path for checkpoints")
    p.add_argument("--checkpoint-every", type=_int, help="steps between checkpoints (100)")
    p.add_argument("--checkpoint-keep", type=_int, default=2, help="checkpoints kept (2)")
    p.add_argument("--resume", action="store_true",
                   help="go on from the newest checkpoint in --checkpoint-dir")
    return p


def _build_score_parser(prog: str, data: bool) -> _Parser:
    p = _Parser(prog=prog, description="Score data with a model on the cluster's workers.")
    p.add_argument("model", help="a notebook name, or a path to a saved model")
    if data:
        p.add_argument("data", help="a notebook name, or a path/URL to zarr, parquet or netCDF")
    p.add_argument("--out", help="notebook name for the result (default: _)")
    p.add_argument("--output", help="write to this .zarr / .parquet path")
    add_score_options(p, integer=_int)
    p.add_argument("--cluster", help="cluster name (default: the current one)")
    return p


# Subparsers are made with the parent's class, so they raise UsageError too.
_PARSER = _build_parser()
_TRAIN_PARSER = _build_train_parser()
_SCORE_LINE_PARSER = _build_score_parser("%batch_score", data=True)
_SCORE_CELL_PARSER = _build_score_parser("%%batch_score", data=False)


def _parse(parser: _Parser, line: str) -> argparse.Namespace | None:
    try:
        return parser.parse_args(shlex.split(line))
    except _HelpShown:
        return None
    except ValueError as e:  # shlex: unbalanced quotes
        raise UsageError(f"{parser.prog}: cannot parse {line!r}: {e}.") from None


@magics_class
class MLCloudMagics(Magics):
    """``%mlcloud``; the training and scoring magics join this class in their modules."""

    @line_magic
    def mlcloud(self, line: str) -> Any:
        """%mlcloud up|status|scale N|adapt MIN MAX|down [--name N | --all]|connect ADDRESS"""
        args = _parse(_PARSER, line)
        if args is None:
            return None
        try:
            return getattr(self, f"_{args.command}")(args)
        except ValueError as e:
            raise UsageError(str(e)) from None

    @cell_magic
    def distributed_train(self, line: str, cell: str) -> Any:
        """%%distributed_train [--workers N] [--out a,b] [--noblock] ...: the cell on every rank."""
        from .train import launch
        from .train.cell import prepare_cell
        from .train.launch import FaultOptions, StrategyOptions
        from .widgets import RunMonitor

        args = _parse(_TRAIN_PARSER, line)
        if args is None or self.shell is None:
            return None
        out = [n.strip() for n in args.out.split(",") if n.strip()]
        try:
            payload = prepare_cell(cell, self.shell.user_ns, out)
            run = launch(
                payload,
                cluster=args.cluster,
                workers=args.workers,
                backend=args.backend,
                seed=args.seed,
                out=out,
                timeout=args.timeout,
                epochs=args.epochs,
                strategy=StrategyOptions.from_options({**vars(args), "name": args.strategy}),
                compression=args.compression,
                faults=FaultOptions.from_options(vars(args)),
            )
        except SyntaxError as e:
            raise UsageError(
                f"the cell has a syntax error on line {e.lineno}: {e.msg}; nothing was sent."
            ) from None
        except ValueError as e:
            raise UsageError(str(e)) from None
        monitor = None
        try:  # from here on, Ctrl-C must stop the ranks, wherever it lands
            monitor = RunMonitor(run)
            display(monitor.widget)
            if args.noblock:
                monitor.follow_in_background()
                if out:
                    user_ns = self.shell.user_ns

                    def bring_back(done: Any) -> None:  # the --out names, once it finished
                        if done.status == "finished":
                            user_ns.update(done.result())

                    run.add_done_callback(bring_back)
                return run
            monitor.follow()
        except KeyboardInterrupt:
            run.cancel()
            if monitor is not None:
                monitor.refresh()
            print(f"Run {run.id} cancelled: every rank stopped and the workers are free.")
            return None
        result = run.result()  # TrainingError shows the failing rank's traceback
        for name in out:
            self.shell.user_ns[name] = result[name]
        return None

    @line_cell_magic
    def batch_score(self, line: str, cell: str | None = None) -> Any:
        """%batch_score MODEL DATA [...] scores DATA; %%batch_score MODEL [...] scores what the
        cell's last expression evaluates to. --output writes, --out names the result."""
        parser = _SCORE_LINE_PARSER if cell is None else _SCORE_CELL_PARSER
        args = _parse(parser, line)
        if args is None or self.shell is None:
            return None
        data = self._lookup(args.data) if cell is None else self._evaluate(cell)
        return self._score(args, data)

    def _evaluate(self, cell: str) -> Any:
        """Run the cell in the notebook's namespace and return its last expression."""
        assert self.shell is not None
        try:
            tree = ast.parse(cell, filename="<batch_score cell>")
        except SyntaxError as e:
            raise UsageError(f"the cell has a syntax error on line {e.lineno}: {e.msg}.") from None
        if not tree.body or not isinstance(tree.body[-1], ast.Expr):
            raise UsageError("%%batch_score: the cell must end with the data to score.")
        head = ast.Module(body=tree.body[:-1], type_ignores=[])
        exec(compile(head, "<batch_score cell>", "exec"), self.shell.user_ns)
        last = ast.Expression(tree.body[-1].value)
        return eval(compile(last, "<batch_score cell>", "eval"), self.shell.user_ns)

    def _lookup(self, token: str) -> Any:
        """A notebook name's value, else the token itself (a path or URL)."""
        assert self.shell is not None
        return self.shell.user_ns.get(token, token)

    def _score(self, args: argparse.Namespace, data: Any) -> Any:
        from .score import score

        assert self.shell is not None
        features = [f.strip() for f in args.features.split(",")] if args.features else None
        try:
            result = score(self._lookup(args.model), data, sample_dim=args.sample_dim,
                           features=features, batch_size=args.batch_size, output=args.output,
                           overwrite=args.overwrite, device=args.device, dtype=args.dtype,
                           cluster=args.cluster)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if args.out:
            self.shell.user_ns[args.out] = result
            return None
        return result

    def _up(self, args: argparse.Namespace) -> None:
        from .widgets import cluster_card

        handle = clusters.up(
            workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            memory_limit=args.memory_limit or "auto",
            gpu=args.gpu,
            name=args.name,
            adapt=args.adapt,
            tls=args.tls,
            address=args.address,
            scheduler_file=args.scheduler_file,
            timeout=args.timeout,
        )
        display(cluster_card(handle))

    def _status(self, args: argparse.Namespace) -> None:
        table = clusters.status()
        if table.empty:
            print("No clusters. Start one with `%mlcloud up`.")
        else:
            display(table)

    def _scale(self, args: argparse.Namespace) -> None:
        handle = clusters.scale(args.n, name=args.name)
        print(f"Scaling {handle.name} to {args.n} worker(s).")

    def _adapt(self, args: argparse.Namespace) -> None:
        handle = clusters.adapt(args.minimum, args.maximum, name=args.name)
        print(f"{handle.name} now adapts between {args.minimum} and {args.maximum} workers.")

    def _down(self, args: argparse.Namespace) -> None:
        closed = clusters.down(name=args.name, all=args.all)
        print(f"Shut down {', '.join(closed)}." if closed else "No clusters to shut down.")

    def _connect(self, args: argparse.Namespace) -> None:
        from .widgets import cluster_card

        handle = clusters.connect(args.address, name=args.name, timeout=args.timeout)
        display(cluster_card(handle))


def _full_help(parser: _Parser) -> str:
    """The parser's help followed by each subcommand's."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser.format_help() + "".join(
        f"\n{sub.format_help()}" for group in groups for sub in group.choices.values())


# `%mlcloud?`, `%%distributed_train?` and `%%batch_score?` show every option, as --help does.
MLCloudMagics.mlcloud.__doc__ = _full_help(_PARSER)
MLCloudMagics.distributed_train.__doc__ = _full_help(_TRAIN_PARSER)
MLCloudMagics.batch_score.__doc__ = (_full_help(_SCORE_LINE_PARSER) + "\n"
                                     + _full_help(_SCORE_CELL_PARSER))


def register(ipython: Any) -> None:
    """Register every magic of the package with an IPython shell."""
    ipython.register_magics(MLCloudMagics)
