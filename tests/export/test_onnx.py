"""The exported ONNX file runs where torch is not installed: a fresh interpreter that sees only
onnxruntime, numpy and what they need."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import jupyter_mlcloud as mlc

from .models import mlp

SCRIPT = """
import sys
sys.path.insert(0, {site!r})
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch is importable here: " + torch.__file__)
import numpy as np
import onnxruntime as ort

session = ort.InferenceSession({model!r}, providers=["CPUExecutionProvider"])
for rows in ({one!r}, {many!r}):
    x = np.load(rows)
    (y,) = session.run(None, {{session.get_inputs()[0].name: x}})
    np.save(rows.replace(".npy", ".out.npy"), y)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxscript")))
"""


def _requirements(name: str, seen: set[str]) -> None:
    """``name`` and every distribution it needs (markers of extras left out)."""
    key = name.lower().replace("_", "-")
    if key in seen:
        return
    seen.add(key)
    for requirement in importlib.metadata.requires(name) or []:
        if "extra ==" in requirement:
            continue
        dependency = requirement.split(";")[0].strip()
        for stop in "<>=!~[ (":
            dependency = dependency.split(stop)[0]
        _requirements(dependency, seen)


def torchless_site(folder: Path) -> Path:
    """A folder of links to onnxruntime, numpy and their dependencies, and nothing else."""
    site = folder / "site"
    site.mkdir()
    names: set[str] = set()
    _requirements("onnxruntime", names)
    _requirements("numpy", names)
    for name in names:
        dist = importlib.metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            source = Path(str(dist.locate_file(top)))
            if top.endswith(".dist-info") or top in ("..", "__pycache__") \
                    or not source.exists():
                continue
            if not (site / top).exists():
                (site / top).symlink_to(source)
    assert not (site / "torch").exists()
    return site


def test_the_onnx_file_runs_without_torch(out: Path) -> None:
    model = mlp()
    rows = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    mlc.export(model, out / "mlp.onnx", example=rows)
    np.save(out / "one.npy", rows[:1])
    many = np.random.default_rng(1).normal(size=(300, 6)).astype(np.float32)
    np.save(out / "many.npy", many)
    site = torchless_site(out)
    script = SCRIPT.format(site=str(site), model=str(out / "mlp.onnx"),
                           one=str(out / "one.npy"), many=str(out / "many.npy"))
    # -I: no user site, no PYTHON* variables; -S: no site-packages (where torch is).
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # neither torch nor onnx was loaded
    with torch.no_grad():
        for name, x in (("one", rows[:1]), ("many", many)):
            expected = model(torch.as_tensor(x)).numpy()
            np.testing.assert_allclose(np.load(out / f"{name}.out.npy"), expected, atol=1e-5)
