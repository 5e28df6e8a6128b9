"""IPython magics: argument parsing only; every action is a call into the Python API."""

from __future__ import annotations

import argparse
import shlex
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.display import display

from . import clusters

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


# Subparsers are made with the parent's class, so they raise UsageError too.
_PARSER = _build_parser()


@magics_class
class MLCloudMagics(Magics):
    """``%mlcloud``; the training and scoring magics join this class in their modules."""

    @line_magic
    def mlcloud(self, line: str) -> Any:
        """%mlcloud up|status|scale N|adapt MIN MAX|down [--name N | --all]|connect ADDRESS"""
        try:
            args = _PARSER.parse_args(shlex.split(line))
        except _HelpShown:
            return None
        except ValueError as e:  # shlex: unbalanced quotes
            raise UsageError(f"%mlcloud: cannot parse {line!r}: {e}.") from None
        try:
            return getattr(self, f"_{args.command}")(args)
        except ValueError as e:
            raise UsageError(str(e)) from None

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


def register(ipython: Any) -> None:
    """Register every magic of the package with an IPython shell."""
    ipython.register_magics(MLCloudMagics)
