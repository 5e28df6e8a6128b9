"""%%tune's options mirror %%distributed_train's run options, so every run option of
mlc.train works in the cell form too (no cluster needed)."""

from __future__ import annotations

import argparse
import inspect

from jupyter_mlcloud.magics import MLCloudMagics
from jupyter_mlcloud.train.launch import train
from jupyter_mlcloud.tuning.study import tune

#: %%distributed_train options a trial has no use for: its size is --workers-per-trial, a
#: study always blocks, and the study (not names from rank 0) is what comes back. --budget
#: bounds the whole study, not each trial (tune's own budget=).
NOT_PER_TRIAL = {"workers", "out", "noblock", "budget"}


def _dests(magic: str) -> set[str]:
    parser = getattr(MLCloudMagics, magic).parser
    return {a.dest for a in parser._actions
            if a.option_strings and a.dest not in ("help", argparse.SUPPRESS)}


def test_tune_takes_every_run_option_of_distributed_train() -> None:
    missing = _dests("distributed_train") - NOT_PER_TRIAL - _dests("tune")
    assert not missing, f"%%tune lacks {sorted(missing)}"


def test_every_option_of_the_cell_form_is_a_keyword_of_tune_or_train() -> None:
    keywords = set(inspect.signature(tune).parameters) | set(inspect.signature(train).parameters)
    assert _dests("tune") - {"out"} <= keywords
