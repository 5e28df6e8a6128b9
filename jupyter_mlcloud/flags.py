"""Flags for the API's options, shared by the front ends that parse command lines (the magics
and the ``jupyter-mlcloud`` CLI), so each option has one name and one help text."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

#: One flag as ``add_argument`` takes it: its option strings and its keywords.
OptionSpec = tuple[tuple[str, ...], dict[str, Any]]


def score_options(integer: Callable[[str], int] = int) -> list[OptionSpec]:
    """The options `mlc.score` takes, as flags, in the order their help lists them.

    Given as data rather than added to a parser, so that the CLI's argparse parser and the
    magics' ``@argument`` decorators build the same flags from one list. ``integer`` parses
    whole numbers (a front end may want its own error text).
    """
    return [
        (("--features",), {"help": "comma-separated variables or columns, in model order"}),
        (("--sample-dim",), {"help": "the sample dimension (default: the first)"}),
        (("--batch-size",), {"type": integer, "default": 1024, "help": "rows per batch (1024)"}),
        (("--overwrite",), {"action": "store_true", "help": "replace an existing output"}),
        (("--device",), {"default": "auto", "help": "auto, cpu or cuda"}),
        (("--dtype",), {"help": "input dtype, e.g. float32 or bfloat16"}),
        (("--no-track",), {"dest": "track", "action": "store_false",
                           "help": "do not record the job in MLflow"}),
    ]


def add_score_options(p: argparse.ArgumentParser, integer: Callable[[str], int] = int) -> None:
    """Add the options `mlc.score` takes to ``p`` (the CLI's parser)."""
    for flags, kwargs in score_options(integer):
        p.add_argument(*flags, **kwargs)


#: Of the serve options, those that exclude each other: a fixed count or autoscale bounds.
SERVE_EXCLUSIVE = ("--replicas", "--autoscale")


def serve_options(integer: Callable[[str], int] = int,
                  number: Callable[[str], float] = float) -> list[OptionSpec]:
    """The options `mlc.serve` takes (all but the model), as flags, with the API's defaults.

    The destinations are the API's keyword names, so :func:`serve_keywords` hands them on
    as they are; the values are checked by the API, which names the allowed ones.
    ``integer`` and ``number`` parse whole and decimal numbers.
    """
    return [
        (("--name",), {"required": True,
                       "help": "the endpoint's name, in its URLs (letters, digits, _ . -)"}),
        (("--replicas",), {"type": integer, "default": 1,
                           "help": "replicas of the model on the workers (1)"}),
        (("--autoscale",), {"metavar": "MIN:MAX",
                            "help": "let the replicas follow the load between MIN and MAX"
                                    " instead of --replicas"}),
        (("--max-batch-size",), {"type": integer, "default": 32,
                                 "help": "most rows a replica runs the model on at once (32)"}),
        (("--max-wait-ms",), {"type": number, "default": 5.0,
                              "help": "most ms a request waits for a batch to fill (5)"}),
        (("--max-queue",), {"type": integer, "default": 256,
                            "help": "requests waiting per replica before 503 (256)"}),
        (("--slo-ms",), {"type": number,
                         "help": "answer 503 at once when the expected wait passes this"}),
        (("--host",), {"help": "address to bind (default: each worker's own)"}),
        (("--certfile",), {"help": "TLS certificate, readable on the workers (default: one"
                                   " made for the endpoint)"}),
        (("--keyfile",), {"help": "TLS private key that goes with --certfile"}),
        (("--device",), {"default": "auto", "help": "auto, cpu or cuda (auto)"}),
        (("--no-track",), {"dest": "track", "action": "store_false",
                           "help": "do not record the endpoint (its alerts, its cost) in MLflow"}),
    ]


def _dest(flags: tuple[str, ...]) -> str:
    return flags[-1].lstrip("-").replace("-", "_")


def add_serve_options(p: argparse.ArgumentParser, integer: Callable[[str], int] = int,
                      number: Callable[[str], float] = float) -> None:
    """Add the options `mlc.serve` takes to ``p`` (a magic's or the CLI's parser), with
    ``--replicas`` and ``--autoscale`` in a mutually exclusive group."""
    group = p.add_mutually_exclusive_group()
    for flags, kwargs in serve_options(integer, number):
        (group if flags[-1] in SERVE_EXCLUSIVE else p).add_argument(*flags, **kwargs)


def serve_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `mlc.serve` that the parsed ``args`` hold."""
    names = [kwargs.get("dest") or _dest(flags) for flags, kwargs in serve_options()]
    return {name: getattr(args, name) for name in names}


def export_options(integer: Callable[[str], int] = int) -> list[OptionSpec]:
    """The options `mlc.export` takes (all but the model and the path), as flags; the
    destinations are the API's keyword names (see :func:`export_keywords`)."""
    return [
        (("--example",), {"help": "an example input of a few rows: a .npy file (or, in a"
                                  " notebook, a name); dimension 0 is the batch"}),
        (("--features",), {"type": integer,
                           "help": "instead of --example: random rows of this many features"
                                   " (default: the width of the model's first Linear layer)"}),
        (("--no-check",), {"dest": "check", "action": "store_false",
                           "help": "write the model without running it against the eager one"}),
        (("--quantize",), {"metavar": "int8",
                           "help": "int8: dynamically quantized ONNX weights (the change on"
                                   " the example is reported)"}),
    ]


def add_export_options(p: argparse.ArgumentParser, integer: Callable[[str], int] = int) -> None:
    """Add the options `mlc.export` takes to ``p`` (a magic's or the CLI's parser)."""
    for flags, kwargs in export_options(integer):
        p.add_argument(*flags, **kwargs)


def export_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `mlc.export` that the parsed ``args`` hold."""
    names = [kwargs.get("dest") or _dest(flags) for flags, kwargs in export_options()]
    return {name: getattr(args, name) for name in names}
