"""Flags for the API's options, shared by the front ends that parse command lines (the magics
and the ``jupyter-mlcloud`` CLI), so each option has one name and one help text."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_score_options(p: argparse.ArgumentParser, integer: Callable[[str], int] = int) -> None:
    """The options `mlc.score` takes, as flags (the CLI's and %batch_score's)."""
    p.add_argument("--features", help="comma-separated variables or columns, in model order")
    p.add_argument("--sample-dim", help="the sample dimension (default: the first)")
    p.add_argument("--batch-size", type=integer, default=1024, help="rows per batch (1024)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", help="input dtype, e.g. float32 or bfloat16")
