"""IPython magics: argument parsing only; every action is a call into the Python API.

The magics' parsers are built by IPython's ``magic_arguments`` decorators, which also make
each magic's docstring (what ``%mlcloud?`` shows) the parser's full help, so that help lists
every option and cannot drift from what is parsed.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import shlex
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, kwds, magic_arguments
from IPython.display import display

from .cluster import api as clusters
from .flags import (
    OptionSpec,
    add_export_options,
    add_serve_options,
    export_keywords,
    score_options,
    serve_keywords,
)

SUBCOMMANDS = ("up", "status", "scale", "adapt", "down", "connect", "models", "serve",
               "endpoints", "unserve", "export")

_F = TypeVar("_F", bound=Callable[..., Any])


class _HelpShown(Exception):
    """``--help`` printed the help: the magic stops there, without an error."""


class _ShowHelp(argparse.Action):
    """``-h/--help``: print the parser's help and stop the magic.

    argparse's own help action ends in ``sys.exit``, which a kernel shows as a traceback, and
    ``magic_arguments`` parsers have no ``--help`` at all; the magics always had one.
    """

    def __init__(self, option_strings: Sequence[str], dest: str,
                 help: str | None = None) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                         nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> NoReturn:
        parser.print_help()
        raise _HelpShown


_HELP: OptionSpec = (("-h", "--help"), {"action": _ShowHelp, "help": "show this help and stop"})


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser: problems raise ``UsageError`` (as ``magic_arguments``' do)."""

    def __init__(self, prog: str, description: str) -> None:
        super().__init__(prog=prog, description=description, add_help=False)
        self.add_argument(*_HELP[0], **_HELP[1])

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return value


def _budget(text: str) -> float | str:
    """``--budget``: a number is a cost, anything else worker time (checked by the API)."""
    try:
        return float(text)
    except ValueError:
        return text


#: The run options of each %%tune trial: those of %%distributed_train but --workers, --out
#: and --noblock (a trial's size is --workers-per-trial; a study always blocks).
TRAIN_OPTIONS: list[OptionSpec] = [
    (("--backend",), {"help": "gloo or nccl (default: nccl on GPUs, else gloo)"}),
    (("--seed",), {"type": _int, "default": 0, "help": "seed for python, numpy, torch (0)"}),
    (("--timeout",), {"type": float, "default": 300.0,
                      "help": "seconds for the rendezvous and each collective (300)"}),
    (("--epochs",), {"type": _int, "help": "default count for ctx.epochs()"}),
    (("--strategy",), {"default": "ddp", "help": "how the model is distributed: ddp, fsdp,"
                                                 " pipeline, ps-sync, ps-async (ddp)"}),
    (("--microbatches",), {"type": _int, "help": "pipeline: microbatches per batch (4)"}),
    (("--pipeline-schedule",), {"default": "1f1b", "help": "pipeline: 1f1b or gpipe (1f1b)"}),
    (("--ps-workers",), {"type": _int, "help": "ps-*: parameter-server shards (1)"}),
    (("--max-staleness",), {"type": _int,
                            "help": "ps-async: most pushes a trainer may run ahead"}),
    (("--compression",), {"default": "none", "help": "gradient compression: none, fp16, bf16,"
                                                     " powersgd[:RANK[:START]] (none)"}),
    (("--max-failures",), {"type": _int, "default": 0,
                           "help": "lost workers to survive by resuming from the last commit (0)"}),
    (("--min-workers",), {"type": _int,
                          "help": "go on with this many workers if no replacement comes"}),
    (("--commit-every",), {"type": _int, "default": 1,
                           "help": "steps between in-memory commits (1)"}),
    (("--elastic",), {"default": "global-batch", "help": "rule when the world shrinks:"
                                                         " global-batch or linear-lr"}),
    (("--checkpoint-dir",), {"help": "fsspec path for checkpoints"}),
    (("--checkpoint-every",), {"type": _int, "help": "steps between checkpoints (100)"}),
    (("--checkpoint-keep",), {"type": _int, "default": 2, "help": "checkpoints kept (2)"}),
    (("--resume",), {"action": "store_true",
                     "help": "go on from the newest checkpoint in --checkpoint-dir"}),
    (("--no-track",), {"dest": "track", "action": "store_false",
                       "help": "do not record the study and its trials in MLflow"}),
]


def _arguments(specs: Sequence[OptionSpec]) -> Callable[[_F], _F]:
    """``@argument`` for each (flags, keywords) pair, in the order given."""

    def decorate(func: _F) -> _F:
        # Decorators apply bottom-up and magic_arguments reverses them: push the last first.
        for flags, kwargs in reversed(specs):
            func = argument(*flags, **kwargs)(func)
        return func

    return decorate


def _subcommand_parsers() -> dict[str, _Parser]:
    parsers: dict[str, _Parser] = {}

    def sub(name: str, description: str) -> _Parser:
        parsers[name] = _Parser(f"%mlcloud {name}", description)
        return parsers[name]

    p = sub("up", "Start a cluster (GPU-aware), or attach to one.")
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
    p.add_argument("--tls", nargs="?", const=True, default=False, metavar="DIR",
                   help="secure every connection: with Security.temporary(), or with the"
                        " certificates in DIR (mlc.cluster_certificates)")
    p.add_argument("--address", help="attach to the scheduler at this address instead")
    p.add_argument("--scheduler-file", help="attach to the scheduler in this file instead")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (10)")

    sub("status", "Show a table of the clusters.")

    p = sub("scale", "Scale to N workers.")
    p.add_argument("n", type=_int, metavar="N", help="number of workers")
    p.add_argument("--name", help="cluster (default: the current one)")

    p = sub("adapt", "Scale adaptively between MIN and MAX workers.")
    p.add_argument("minimum", type=_int, metavar="MIN", help="fewest workers")
    p.add_argument("maximum", type=_int, metavar="MAX", help="most workers")
    p.add_argument("--name", help="cluster (default: the current one)")

    p = sub("down", "Shut down the current cluster.")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--name", help="shut down this cluster instead")
    which.add_argument("--all", action="store_true", help="every cluster of this kernel")

    p = sub("connect", "Attach to a running cluster.")
    p.add_argument("address", help="scheduler address, scheduler file or discovered name")
    p.add_argument("--name", help="name to use here")
    p.add_argument("--tls", metavar="DIR",
                   help="certificates for a tls:// scheduler (mlc.cluster_certificates)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (10)")

    sub("models", "List the registered MLflow models, their versions and aliases.")

    p = sub("serve", "Serve a model as an HTTPS endpoint (token and TLS) on the cluster's"
                     " workers; the Endpoint is the result.")
    p.add_argument("model", metavar="MODEL",
                   help="a notebook name, a path to a saved model, or models:/NAME@ALIAS")
    add_serve_options(p, integer=_int, number=_float)
    p.add_argument("--cluster", help="cluster name (default: the current one)")

    p = sub("endpoints", "Show a table of the endpoints running on the cluster.")
    p.add_argument("--cluster", help="cluster name (default: the current one)")

    p = sub("unserve", "Stop an endpoint: its router and every replica.")
    p.add_argument("endpoint", metavar="NAME", help="the endpoint's name")
    p.add_argument("--cluster", help="cluster name (default: the current one)")

    p = sub("export", "Export a model to ONNX (.onnx, runs in onnxruntime) or torch.export"
                      " (.pt2), checked against the eager model; the ExportResult is the result.")
    p.add_argument("model", metavar="MODEL",
                   help="a notebook name, a path to a saved model, or models:/NAME@ALIAS")
    p.add_argument("path", metavar="PATH", help="where to write it: a .onnx or .pt2 file")
    add_export_options(p, integer=_int)
    assert tuple(parsers) == SUBCOMMANDS
    return parsers


#: ``%mlcloud``'s subcommands, each with its parser (the magic's own parser takes the name).
SUBCOMMAND_PARSERS = _subcommand_parsers()


def _subcommands_help() -> str:
    """Every subcommand's help, for ``%mlcloud?`` (made from the parsers, so it is current)."""
    return "subcommands:\n\n" + "\n".join(p.format_help() for p in SUBCOMMAND_PARSERS.values())


def _split(line: str, prog: str) -> list[str]:
    # POSIX shlex, as a shell does: parse_argstring's splitter would keep the quotes of
    # `--name 'a b'` in the value.
    try:
        return shlex.split(line)
    except ValueError as e:  # unbalanced quotes
        raise UsageError(f"{prog}: cannot parse {line!r}: {e}.") from None


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's option flags, but for --help (argparse keeps its actions in _actions)."""
    return [f for a in parser._actions if not isinstance(a, _ShowHelp) for f in a.option_strings]


def _problem(prog: str, message: str, parser: argparse.ArgumentParser, hint: str) -> UsageError:
    """One sentence: the magic, argparse's complaint (with the options, when one is unknown),
    and where the help is."""
    text = message.rstrip(".")
    if text.startswith("unrecognized arguments:"):
        flags = _flags(parser)
        unknown = text.split(":", 1)[1].split()
        # Compared without the dashes, which every flag shares and which would make any
        # two flags look alike.
        names = {f.lstrip("-"): f for f in flags}
        near = difflib.get_close_matches(unknown[0].lstrip("-"), names, n=1) if unknown else []
        if near and unknown[0].startswith("-"):
            text += f" (did you mean {names[near[0]]}?)"
        text += f"; the options are {', '.join(flags)}" if flags else "; it takes no options"
    return UsageError(f"{prog}: {text}; see `{hint}`.")


def _parse(parser: argparse.ArgumentParser, argv: list[str], prog: str,
           hint: str) -> argparse.Namespace | None:
    """The parsed arguments, or None once --help was shown; problems raise one UsageError."""
    try:
        return parser.parse_args(argv)
    except _HelpShown:
        return None
    except UsageError as e:
        raise _problem(prog, str(e), parser, hint) from None


def _parser_of(magic: Any) -> argparse.ArgumentParser:
    """The parser ``@magic_arguments`` built for ``magic`` (and kept on it)."""
    parser: argparse.ArgumentParser = magic.parser
    return parser


def _parse_magic(magic: Any, line: str, prog: str) -> argparse.Namespace | None:
    """Parse ``line`` with the parser ``@magic_arguments`` built for ``magic``."""
    return _parse(_parser_of(magic), _split(line, prog), prog, f"{prog}?")


@magics_class
class MLCloudMagics(Magics):
    """``%mlcloud``, ``%%distributed_train``, ``%%tune`` and ``%batch_score`` /
    ``%%batch_score``."""

    @line_magic
    @magic_arguments()
    @kwds(epilog=_subcommands_help())
    @argument(*_HELP[0], **_HELP[1])
    @argument("subcommand", choices=SUBCOMMANDS, metavar="SUBCOMMAND",
              help="what to do: %(choices)s")
    # REMAINDER: all after SUBCOMMAND, options and --help too, is left to the subcommand's parser.
    @argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
              help="the subcommand's arguments and options, listed below")
    def mlcloud(self, line: str) -> Any:
        """Manage Dask clusters and endpoints, export models: `%mlcloud SUBCOMMAND [ARGS]`.

        Each subcommand's arguments and options are listed below;
        `%mlcloud SUBCOMMAND --help` prints one subcommand's alone.
        """
        parser = _parser_of(MLCloudMagics.mlcloud)
        argv = _split(line, "%mlcloud")
        if not argv:  # argparse would also name ARGS, which may well be empty
            raise _problem("%mlcloud", "the following arguments are required: SUBCOMMAND"
                           f" (one of {', '.join(SUBCOMMANDS)})", parser, "%mlcloud?")
        top = _parse(parser, argv, "%mlcloud", "%mlcloud?")
        if top is None:
            return None
        prog = f"%mlcloud {top.subcommand}"
        args = _parse(SUBCOMMAND_PARSERS[top.subcommand], top.args, prog, f"{prog} --help")
        if args is None:
            return None
        try:
            return getattr(self, f"_{top.subcommand}")(args)
        except ValueError as e:
            raise UsageError(str(e)) from None

    @cell_magic
    @magic_arguments("%distributed_train")  # its usage line then reads %%distributed_train
    @argument(*_HELP[0], **_HELP[1])
    @argument("--workers", type=_int, help="ranks, one per worker (default: every free one)")
    @argument("--cluster", help="cluster name (default: the current one)")
    @argument("--backend", help="gloo or nccl (default: nccl on GPUs, else gloo)")
    @argument("--seed", type=_int, default=0, help="seed for python, numpy, torch (0)")
    @argument("--out", default="", help="comma-separated names to bring back from rank 0")
    @argument("--noblock", action="store_true", help="return a Run at once")
    @argument("--timeout", type=float, default=300.0,
              help="seconds for the rendezvous and each collective (300)")
    @argument("--epochs", type=_int, help="default count for ctx.epochs()")
    @argument("--strategy", default="ddp",
              help="how the model is distributed: ddp, fsdp, pipeline, ps-sync, ps-async (ddp)")
    @argument("--microbatches", type=_int, help="pipeline: microbatches per batch (4)")
    @argument("--pipeline-schedule", default="1f1b", help="pipeline: 1f1b or gpipe (1f1b)")
    @argument("--ps-workers", type=_int, help="ps-*: parameter-server shards (1)")
    @argument("--max-staleness", type=_int,
              help="ps-async: most pushes a trainer may run ahead of the slowest")
    @argument("--compression", default="none",
              help="gradient compression: none, fp16, bf16, powersgd[:RANK[:START]] (none)")
    @argument("--max-failures", type=_int, default=0,
              help="lost workers to survive by resuming from the last commit (0)")
    @argument("--min-workers", type=_int,
              help="go on with this many workers if no replacement comes")
    @argument("--commit-every", type=_int, default=1, help="steps between in-memory commits (1)")
    @argument("--elastic", default="global-batch",
              help="rule when the world shrinks: global-batch or linear-lr (global-batch)")
    @argument("--checkpoint-dir", help="fsspec path for checkpoints")
    @argument("--checkpoint-every", type=_int, help="steps between checkpoints (100)")
    @argument("--checkpoint-keep", type=_int, default=2, help="checkpoints kept (2)")
    @argument("--resume", action="store_true",
              help="go on from the newest checkpoint in --checkpoint-dir")
    @argument("--no-track", dest="track", action="store_false",
              help="do not record the run in MLflow")
    @argument("--budget", type=_budget,
              help="a hard stop: a cost (a number, priced by mlcloud.cost.prices) or worker"
                   " time as 2h, 30m or 90s")
    def distributed_train(self, line: str, cell: str) -> Any:
        """Run the cell data-parallel on the cluster's workers, one rank per worker.

        The cell sees the notebook's names and `ctx` (its rank, world size, device and
        data helpers); --out brings names back from rank 0 when the run is done.
        """
        args = _parse_magic(MLCloudMagics.distributed_train, line, "%%distributed_train")
        if args is None or self.shell is None:
            return None
        from .train import launch  # only now: a bad line is refused without loading train
        from .train.cell import prepare_cell
        from .train.options import FaultOptions, StrategyOptions
        from .widgets import RunMonitor

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
                track=args.track,
                budget=args.budget,
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
        if run.stop_reason:  # a planned stop (its budget reached): the sentence says it all
            print(f"Run {run.id}: {run.stop_reason}")
            return None
        result = run.result()  # TrainingError shows the failing rank's traceback
        for name in out:
            self.shell.user_ns[name] = result[name]
        return None

    @cell_magic
    @magic_arguments("%tune")  # its usage line then reads %%tune
    @argument(*_HELP[0], **_HELP[1])
    @argument("--space", required=True,
              help="the search space: NAME=KIND(ARGS) items separated by commas, KIND one of"
                   " log(LOW,HIGH), uniform(LOW,HIGH), int(LOW,HIGH), logint(LOW,HIGH),"
                   " choice(A,B,...)")
    @argument("--n-trials", type=_int, default=20, help="trials in the study (20)")
    @argument("--metric", default="loss", help="the ctx.report value to optimize (loss)")
    @argument("--direction", default="minimize", help="minimize or maximize (minimize)")
    @argument("--pruner", help="successive-halving, hyperband, median or none (median)")
    @argument("--sampler", help="tpe, random, qmc, brute-force, gp or cmaes, as NAME or"
                                " NAME:SEED (tpe)")
    @argument("--workers-per-trial", type=_int, default=1, help="ranks of each trial (1)")
    @argument("--concurrency", type=_int,
              help="trials at a time (default: free workers // --workers-per-trial)")
    @argument("--storage", help="sqlite:///FILE or a journal file: the study resumes from it")
    @argument("--study-name", help="the study's name (needed with --storage)")
    @argument("--out", help="notebook name for the study (default: the cell's result)")
    @argument("--cluster", help="cluster name (default: the current one)")
    @argument("--budget", type=_budget,
              help="the study's budget: no new trial once it cannot cover one more; a cost"
                   " or worker time as 2h, 30m or 90s")
    @_arguments(TRAIN_OPTIONS)
    def tune(self, line: str, cell: str) -> Any:
        """Tune the cell's hyperparameters with Optuna, each trial a run on the cluster.

        The cell is training code as for %%distributed_train; `ctx.params` (also `params`)
        holds the trial's values, and `ctx.report(loss=...)` feeds the pruner. Every
        %%distributed_train option but --workers, --out and --noblock applies to each trial.
        """
        args = _parse_magic(MLCloudMagics.tune, line, "%%tune")
        if args is None or self.shell is None:
            return None
        from .tuning.cell import cell_function  # only now: optuna loads when a study runs
        from .tuning.space import parse_space
        from .tuning.study import describe, tune

        options = vars(args)
        out = options.pop("out")
        try:
            space = parse_space(options.pop("space"))
            study = tune(cell_function(cell, self.shell.user_ns), space=space, **options)
        except SyntaxError as e:
            raise UsageError(
                f"the cell has a syntax error on line {e.lineno}: {e.msg}; nothing was sent."
            ) from None
        except ValueError as e:
            raise UsageError(str(e)) from None
        except KeyboardInterrupt:
            print("Study interrupted: its running trials were cancelled (with --storage they"
                  " run again when the cell is run again).")
            return None
        print(describe(study))
        if out:
            self.shell.user_ns[out] = study
            return None
        return study

    @line_cell_magic
    @magic_arguments()
    @argument(*_HELP[0], **_HELP[1])
    @argument("model", help="a notebook name, or a path to a saved model")
    # One parser serves both forms: DATA is required on the line and refused in the cell form.
    @argument("data", nargs="?",
              help="%%batch_score only: a notebook name, or a path/URL to zarr, parquet or"
                   " netCDF (%%%%batch_score scores the cell's last expression instead)")
    @argument("--out", help="notebook name for the result (default: _)")
    @argument("--output", help="write to this .zarr / .parquet path")
    @_arguments(score_options(integer=_int))
    @argument("--cluster", help="cluster name (default: the current one)")
    def batch_score(self, line: str, cell: str | None = None) -> Any:
        """Score data with a model on the cluster's workers.

        `%batch_score MODEL DATA [options]` scores DATA; `%%batch_score MODEL [options]`
        runs the cell and scores what its last expression evaluates to. --output writes
        the scores to a store, --out names the result in the notebook.
        """
        prog = "%batch_score" if cell is None else "%%batch_score"
        parser = _parser_of(MLCloudMagics.batch_score)
        args = _parse_magic(MLCloudMagics.batch_score, line, prog)
        if args is None or self.shell is None:
            return None
        if cell is None and args.data is None:
            raise _problem(prog, "the following arguments are required: data", parser,
                           f"{prog}?")
        if cell is not None and args.data is not None:
            raise _problem(prog, f"unrecognized arguments: {args.data} (the cell gives the data)",
                           parser, f"{prog}?")
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
        from .scoring.api import score

        assert self.shell is not None
        features = [f.strip() for f in args.features.split(",")] if args.features else None
        try:
            result = score(self._lookup(args.model), data, sample_dim=args.sample_dim,
                           features=features, batch_size=args.batch_size, output=args.output,
                           overwrite=args.overwrite, device=args.device, dtype=args.dtype,
                           cluster=args.cluster, track=args.track)
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

        handle = clusters.connect(args.address, name=args.name, timeout=args.timeout,
                                  security=args.tls)
        display(cluster_card(handle))

    def _models(self, args: argparse.Namespace) -> Any:
        from .tracking.registry import table

        return table()

    def _model(self, token: str, prog: str) -> Any:
        """MODEL of a subcommand: a notebook name's value, else a path or models:/ URI."""
        model = self._lookup(token)
        if model is token and token.isidentifier() and not os.path.exists(token):
            raise UsageError(f"{prog}: MODEL {token!r} is neither a name in the notebook nor a"
                             " saved model file; pass a model's name, a path or"
                             " models:/NAME@ALIAS.")
        return model

    def _serve(self, args: argparse.Namespace) -> Any:
        from .serving.api import serve
        from .serving.catalog import versions_text

        assert self.shell is not None
        model = self._model(args.model, "%mlcloud serve")
        endpoint = serve(model, cluster=args.cluster, **serve_keywords(args))
        bounds = endpoint.autoscale
        scaling = f", autoscaling {bounds[0]}:{bounds[1]}" if bounds else ""
        print(f"Serving {endpoint.name!r} at {endpoint.url} ({versions_text(endpoint.versions)},"
              f" {len(endpoint.replicas)} replica(s){scaling}); the Endpoint is the result (_).")
        print(f"Token: _.token; CA certificate: {endpoint.ca_file}")
        print(f"Call it: _.predict(x), or POST Open Inference Protocol v2 JSON to"
              f" {endpoint.infer_url()} with 'Authorization: Bearer <token>'.")
        return endpoint

    def _endpoints(self, args: argparse.Namespace) -> Any:
        from .serving.catalog import table

        found = table(args.cluster)
        if found.empty:
            print("No endpoints on this cluster. Start one with `%mlcloud serve MODEL --name N`.")
            return None
        return found

    def _unserve(self, args: argparse.Namespace) -> None:
        from .serving.catalog import find

        find(args.endpoint, args.cluster).close()
        print(f"Stopped endpoint {args.endpoint!r}: its router and replicas are gone.")

    def _export(self, args: argparse.Namespace) -> Any:
        from .export import export

        keywords = export_keywords(args)
        if args.example is not None:
            keywords["example"] = self._lookup(args.example)
        return export(self._model(args.model, "%mlcloud export"), args.path, **keywords)


# No abbreviated options in %%tune: --workers (a %%distributed_train habit) must not mean
# --workers-per-trial silently.
_parser_of(MLCloudMagics.tune).allow_abbrev = False


def register(ipython: Any) -> None:
    """Register every magic of the package with an IPython shell."""
    ipython.register_magics(MLCloudMagics)
