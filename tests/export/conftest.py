"""The export tests write into a folder of their own (tmp_path also holds the Jupyter runtime
dir), so a test can see that nothing but the exported file was left there."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    folder.mkdir()
    return folder
