"""The protobuf contracts pass `buf lint` (STANDARD + COMMENTS) and `buf build` with the repo's buf.yaml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_BUF = REPO_ROOT / ".tools" / "node_modules" / ".bin" / "buf"


@pytest.fixture(scope="module")
def buf() -> str:
    """The Buf CLI: the pinned copy under .tools/ first, else one on PATH."""
    if LOCAL_BUF.exists():
        return str(LOCAL_BUF)
    found = shutil.which("buf")
    if found is None:
        pytest.skip("Buf CLI not installed (npm install --prefix .tools @bufbuild/buf)")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_buf_lint_passes(buf: str) -> None:
    result = _run(buf, "lint")
    assert result.returncode == 0, f"buf lint failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"


def test_buf_build_succeeds(buf: str, tmp_path: Path) -> None:
    image = tmp_path / "image.binpb"
    result = _run(buf, "build", "-o", str(image))
    assert result.returncode == 0, f"buf build failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
    assert image.stat().st_size > 0
