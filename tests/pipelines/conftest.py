"""A four-step pipeline of real files, and the names that keep each test's cache its own."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jupyter_mlcloud.pipelines import Pipeline, pipeline


@pytest.fixture
def name() -> str:
    """A pipeline name of this test's own: the session's MLflow store (in a temp dir) holds
    every test's records, and the cache is looked up by pipeline name."""
    return f"t-{uuid.uuid4().hex[:10]}"


def nightly(root: Path, name: str, calls: list[str], *, fail: Path | None = None,
            threshold: float = 0.0) -> Pipeline:
    """prepare -> train -> evaluate -> register, each appending its name to ``calls``.
    ``fail``: while that file exists, train raises. register runs only if the score passes
    ``threshold``."""
    pipe = pipeline(name, root=root)

    @pipe.step(params={"n": 8}, outputs={"data": "work/data.json"})
    def prepare(data: str, n: int) -> None:
        calls.append("prepare")
        Path(data).write_text(json.dumps(list(range(n))))

    @pipe.step(inputs=["data"], params={"lr": 0.5}, outputs={"model": "work/model.json"})
    def train(data: str, lr: float, model: str) -> None:
        calls.append("train")
        with open(model, "w") as f:
            f.write("partial")  # a half-written file: must never reach work/model.json
            if fail is not None and fail.exists():
                raise RuntimeError("the training diverged")
            f.seek(0)
            json.dump({"w": sum(json.loads(Path(data).read_text())) * lr}, f)

    @pipe.step(inputs=["model"], outputs=["score"])
    def evaluate(model: str) -> float:
        calls.append("evaluate")
        return float(json.loads(Path(model).read_text())["w"])

    def better(score: float) -> bool:
        return score > threshold

    @pipe.step(inputs=["score"], outputs=["version"], when=better)
    def register(score: float) -> str:
        calls.append("register")
        return f"models:/digits/{score:g}"

    return pipe


@pytest.fixture
def make() -> Callable[..., Any]:
    return nightly
