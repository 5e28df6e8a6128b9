"""Search spaces: Optuna distributions, checked, and the text form of ``%%tune --space``.

The text form is a comma-separated list of ``NAME=KIND(ARGS)``::

    lr=log(1e-4,1), width=int(16,256), act=choice(relu,tanh), p=uniform(0,0.5)
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

#: Each kind of the text form, with what it becomes.
FORMS = {
    "log": "log(LOW,HIGH): a float drawn on a log scale, 0 < LOW < HIGH",
    "uniform": "uniform(LOW,HIGH): a float, LOW < HIGH",
    "int": "int(LOW,HIGH): a whole number from LOW to HIGH, both included",
    "logint": "logint(LOW,HIGH): a whole number on a log scale, 1 <= LOW < HIGH",
    "choice": "choice(A,B,...): one of the values (numbers stay numbers, the rest are text)",
}
_ITEM = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*([a-z]+)\s*\(([^()]*)\)\s*")


class SpaceError(ValueError):
    """A search space that cannot be used; the message names the bad part."""


def _allowed() -> str:
    return "allowed forms: " + "; ".join(FORMS.values())


def _number(text: str, name: str, whole: bool = False) -> float:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            whole and not isinstance(value, int)):
        kind = "a whole number" if whole else "a number"
        raise SpaceError(f"{name}: {text.strip()!r} is not {kind}; {_allowed()}.")
    return value


def _choice(text: str) -> Any:
    """A choice as written: numbers, True/False/None stay what they are, the rest is text."""
    text = text.strip()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (int, float, bool, str)) or value is None else text


def _distribution(name: str, kind: str, args: str) -> Any:
    import optuna

    dist = optuna.distributions
    parts = [a for a in (p.strip() for p in args.split(",")) if a] if args.strip() else []
    where = f"{name}={kind}({args})"
    if kind not in FORMS:
        raise SpaceError(f"{where}: {kind!r} is not a kind of distribution; {_allowed()}.")
    if kind == "choice":
        if not parts:
            raise SpaceError(f"{where}: choice needs at least one value; {_allowed()}.")
        return dist.CategoricalDistribution([_choice(p) for p in parts])
    if len(parts) != 2:
        raise SpaceError(f"{where}: {kind} takes two bounds, got {len(parts)}; {_allowed()}.")
    whole = kind in ("int", "logint")
    low, high = (_number(p, where, whole) for p in parts)
    if not low < high:
        raise SpaceError(f"{where}: LOW must be below HIGH; {_allowed()}.")
    if kind == "log" and low <= 0:
        raise SpaceError(f"{where}: a log scale needs LOW > 0; {_allowed()}.")
    if kind == "logint" and low < 1:
        raise SpaceError(f"{where}: a log scale of whole numbers needs LOW >= 1; {_allowed()}.")
    if whole:
        return dist.IntDistribution(int(low), int(high), log=kind == "logint")
    return dist.FloatDistribution(float(low), float(high), log=kind == "log")


def parse_space(text: str) -> dict[str, Any]:
    """``"lr=log(1e-4,1), act=choice(relu,tanh)"`` as Optuna distributions, by name.

    Raises :class:`SpaceError` (a ``ValueError``) naming the part that is wrong and listing
    the allowed forms (:data:`FORMS`).
    """
    if not isinstance(text, str) or not text.strip():
        raise SpaceError(f"the search space is empty ({text!r}); give NAME=KIND(ARGS) items"
                         f" separated by commas; {_allowed()}.")
    space: dict[str, Any] = {}
    position = 0
    while position < len(text):
        match = _ITEM.match(text, position)
        if match is None:
            bad = text[position:].split(",")[0].strip() or text[position:].strip()
            raise SpaceError(f"cannot read {bad!r} in the search space {text!r}; write"
                             f" NAME=KIND(ARGS) items separated by commas; {_allowed()}.")
        name, kind, args = match.groups()
        if name in space:
            raise SpaceError(f"{name!r} appears twice in the search space {text!r}.")
        space[name] = _distribution(name, kind, args)
        position = match.end()
        if position < len(text):
            if text[position] != ",":
                raise SpaceError(f"expected a comma after {match.group(0).strip()!r} in the"
                                 f" search space {text!r}.")
            position += 1
    return space


def check_space(space: Any) -> dict[str, Any]:
    """``space`` as a dict of Optuna distributions: a mapping of name -> distribution, or the
    text form (:func:`parse_space`). Anything else is refused in one sentence."""
    if isinstance(space, str):
        return parse_space(space)
    import optuna

    if not isinstance(space, Mapping) or not space:
        raise SpaceError(f"space must be a non-empty mapping of name -> optuna distribution (or"
                         f" text such as 'lr=log(1e-4,1)'), got {space!r}.")
    for name, value in space.items():
        if not isinstance(name, str) or not name:
            raise SpaceError(f"space names must be non-empty text, got {name!r}.")
        if not isinstance(value, optuna.distributions.BaseDistribution):
            raise SpaceError(
                f"space[{name!r}] is {value!r}, not an optuna distribution; use e.g."
                " optuna.distributions.FloatDistribution(1e-4, 1, log=True).")
    return dict(space)
