"""Record the contracts in proto/ as the baseline that `buf breaking` checks every change against."""

# The baseline is proto/contract-image.binpb, a Buf image (`buf build -o`) without source info, so
# that comments can change without a refresh. tests/contract/test_buf_breaking.py checks the tree
# against it and that it is current; see docs/development.md, "Contract compatibility".

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_PATH = Path("proto") / "contract-image.binpb"
LOCAL_BUF = Path(".tools") / "node_modules" / ".bin" / "buf"
# `buf breaking` exits with 100 when it found breaking changes (1 is any other failure).
BUF_FOUND_VIOLATIONS = 100


def find_buf(root: Path) -> str:
    """The Buf CLI: the pinned copy under .tools/ first, else one on PATH."""
    if (root / LOCAL_BUF).exists():
        return str(root / LOCAL_BUF)
    found = shutil.which("buf")
    if found is None:
        raise SystemExit("Buf CLI not found: npm install --prefix .tools @bufbuild/buf@$(cut -d= -f2 .tools-versions)")
    return found


def _run(buf: str, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([buf, *args], cwd=root, capture_output=True, text=True, timeout=300, check=False)


def _source(ref: str | None) -> str:
    """The buf input: the working tree, or the repository at a git ref (as committed, nothing else)."""
    return "." if ref is None else f".git#ref={ref}"


def refresh(root: Path, *, ref: str | None, allow_breaking: bool) -> str:
    """Check the contracts against the current baseline, then record them; returns what was done."""
    buf = find_buf(root)
    image = root / IMAGE_PATH
    source = _source(ref)
    if image.exists():
        check = _run(buf, root, "breaking", source, "--against", str(IMAGE_PATH))
        if check.returncode == BUF_FOUND_VIOLATIONS and not allow_breaking:
            raise SystemExit(
                f"{check.stdout}{check.stderr}"
                f"refusing to record breaking changes to the contracts in {IMAGE_PATH}: clients and participants "
                "built against the recorded contracts would break. Add a new package version (for example "
                "sagasuite.payment.v2) instead, or pass --allow-breaking if nobody depends on them yet."
            )
        if check.returncode not in (0, BUF_FOUND_VIOLATIONS):
            raise SystemExit(f"buf breaking failed (exit {check.returncode}):\n{check.stdout}{check.stderr}")
    with tempfile.TemporaryDirectory() as scratch:
        built = Path(scratch) / "image.binpb"
        result = _run(buf, root, "build", source, "--exclude-source-info", "-o", str(built))
        if result.returncode != 0:
            raise SystemExit(f"buf build failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
        if image.exists() and image.read_bytes() == built.read_bytes():
            return f"{IMAGE_PATH} already records these contracts"
        shutil.copyfile(built, image)
    return f"recorded the contracts of {'the working tree' if ref is None else ref} in {IMAGE_PATH}: commit it"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", help="record the contracts committed at this git ref instead of the working tree")
    parser.add_argument(
        "--allow-breaking", action="store_true", help="record even if buf breaking finds breaking changes"
    )
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help=argparse.SUPPRESS)  # tests run on a copy
    options = parser.parse_args()
    print(refresh(options.root.resolve(), ref=options.ref, allow_breaking=options.allow_breaking), file=sys.stderr)


if __name__ == "__main__":
    main()
