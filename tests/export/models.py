"""Models the export tests share: plain ones that export, and ones that cannot."""

from __future__ import annotations

import torch


def mlp(features: int = 6, classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(features, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, classes))


class Branchy(torch.nn.Module):
    """Branches on a tensor's value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # the line the error must name
            return self.linear(x)
        return -self.linear(x)


class Svd(torch.nn.Module):
    """Uses an operator the ONNX converter has no translation for."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(self.linear(x))[0]


class FixedBatch(torch.nn.Module):
    """Reshapes with the example's batch size written in."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).view(4, -1)


class TwoHeads(torch.nn.Module):
    """Two inputs (one of them token ids) and a dict of two outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(10, 4)
        self.linear = torch.nn.Linear(6, 4)
        self.dropout = torch.nn.Dropout(0.5)  # must be off in the exported model

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(self.linear(x) + self.embed(ids).sum(1))
        return {"logits": h, "score": h.sum(1, keepdim=True)}


def huge_weights() -> torch.nn.Module:
    """Weights so large that float32 sums in another order differ by far more than 1e-4."""
    model = mlp(6, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e4)
    return model
