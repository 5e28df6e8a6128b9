"""Unit tests of ``--compression`` parsing (:mod:`jupyter_mlcloud.train.options`):
every accepted form, the text that travels to the workers, and one sentence per bad value."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from jupyter_mlcloud.train.options import (
    COMPRESSIONS,
    POWERSGD_START_ITER,
    CompressionSpec,
    parse_compression,
)

ALLOWED = ("allowed: none, fp16, bf16, powersgd, powersgd:RANK, powersgd:RANK:START.")


@pytest.mark.parametrize(("text", "kind", "rank", "start", "shown"), [
    ("none", "none", 1, 2, "none"),
    ("fp16", "fp16", 1, 2, "fp16"),
    ("bf16", "bf16", 1, 2, "bf16"),
    ("powersgd", "powersgd", 1, 2, "powersgd:1"),
    ("powersgd:1", "powersgd", 1, 2, "powersgd:1"),
    ("powersgd:4", "powersgd", 4, 2, "powersgd:4"),
    ("powersgd:32", "powersgd", 32, 2, "powersgd:32"),
    ("powersgd:007", "powersgd", 7, 2, "powersgd:7"),
    ("powersgd:4:2", "powersgd", 4, 2, "powersgd:4"),  # the default start is not shown
    ("powersgd:4:3", "powersgd", 4, 3, "powersgd:4:3"),
    ("powersgd:2:1000", "powersgd", 2, 1000, "powersgd:2:1000"),
    ("powersgd:2:020", "powersgd", 2, 20, "powersgd:2:20"),
])
def test_accepted_forms(text: str, kind: str, rank: int, start: int, shown: str) -> None:
    spec = parse_compression(text)
    assert (spec.kind, spec.rank, spec.start) == (kind, rank, start)
    assert str(spec) == shown
    assert parse_compression(shown) == spec  # what travels to the workers means the same


def test_the_defaults() -> None:
    assert POWERSGD_START_ITER == 2
    assert CompressionSpec() == CompressionSpec("none", 1, 2)
    assert str(CompressionSpec()) == "none"
    assert COMPRESSIONS == ("none", "fp16", "bf16", "powersgd")


@pytest.mark.parametrize("rank", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("start", [2, 3, 10, 999])
def test_every_powersgd_spec_round_trips(rank: int, start: int) -> None:
    spec = CompressionSpec("powersgd", rank, start)
    assert parse_compression(str(spec)) == spec
    assert parse_compression(f"powersgd:{rank}:{start}") == spec


def test_a_spec_is_passed_through_and_is_a_frozen_value() -> None:
    spec = CompressionSpec("powersgd", 2, 20)
    assert parse_compression(spec) is spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rank = 3  # type: ignore[misc]
    assert {spec, CompressionSpec("powersgd", 2, 20)} == {spec}
    assert CompressionSpec("powersgd", 2, 20) != CompressionSpec("powersgd", 2, 21)


def test_the_kind_alone_ignores_rank_and_start_when_shown() -> None:
    assert str(CompressionSpec("fp16", 5, 9)) == "fp16"


@pytest.mark.parametrize("text", [
    "FP16", "Powersgd", " fp16", "fp16 ", "fp32", "int8", "", "powersgd2", "fp16:2",
    "bf16:1:2", "none:0", "topk:2", None, 16,
])
def test_an_unknown_kind_names_the_value_and_the_allowed_forms(text: Any) -> None:
    with pytest.raises(ValueError) as caught:
        parse_compression(text)
    assert str(caught.value) == f"compression {text!r} is not available; {ALLOWED}"


@pytest.mark.parametrize("text", ["powersgd:0", "powersgd:-1", "powersgd:x", "powersgd:1.5",
                                  "powersgd: 2", "powersgd::5", "powersgd:0:10"])
def test_a_bad_rank_is_named(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_compression(text)
    assert str(caught.value) == (
        f"compression {text!r} needs a whole PowerSGD rank >= 1, e.g. powersgd:2.")


@pytest.mark.parametrize("text", ["powersgd:2:0", "powersgd:2:1", "powersgd:2:-5",
                                  "powersgd:2:x", "powersgd:2:2.5", "powersgd:2:3:4"])
def test_a_bad_start_is_named(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_compression(text)
    assert str(caught.value) == (
        f"compression {text!r} needs a whole PowerSGD start step >= 2 (plain all-reduce steps"
        " before compressing), e.g. powersgd:2:20.")


def test_a_missing_start_after_a_second_colon_is_named() -> None:
    with pytest.raises(ValueError) as caught:
        parse_compression("powersgd:2:")
    assert str(caught.value) == (
        "compression 'powersgd:2:' needs a start step after the second ':', e.g. powersgd:2:20.")


@pytest.mark.parametrize("text", ["bogus", "powersgd:0", "powersgd:2:1", "powersgd:2:"])
def test_each_error_is_one_sentence_on_one_line(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_compression(text)
    message = str(caught.value)
    assert "\n" not in message and message.endswith(".")
    assert re.search(re.escape(repr(text)), message)


@pytest.mark.parametrize("text", ["powersgd:", "fp16:", "none:"])
def test_a_trailing_colon_after_the_kind_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_compression(text)


def test_a_superscript_rank_gets_the_rank_sentence() -> None:
    with pytest.raises(ValueError, match="needs a whole PowerSGD rank >= 1"):
        parse_compression("powersgd:\u00b2")
