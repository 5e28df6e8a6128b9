"""What the serving tests share: a small model and its expected outputs, Open Inference
Protocol bodies, Prometheus samples, and whether a port is closed."""

from __future__ import annotations

import re
import socket
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def expected(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def v2_body(x: np.ndarray, datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": datatype,
                        "data": x.reshape(-1).tolist()}], **extra}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def refused(url: str) -> bool:
    """Whether nothing listens at ``url``'s host and port any more."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False
