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
