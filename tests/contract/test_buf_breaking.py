"""A breaking change to the contracts in proto/ fails here: `buf breaking` against the recorded baseline image."""

# The baseline is proto/contract-image.binpb, the contracts as last committed on main, recorded by
# scripts/refresh_contract_image.py (docs/development.md, "Contract compatibility"). CI runs on a fresh
# clone of main, where comparing with git history would compare main with itself; a committed image
# holds the last accepted state in every clone, however shallow.

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE = Path("proto") / "contract-image.binpb"
LOCAL_BUF = REPO_ROOT / ".tools" / "node_modules" / ".bin" / "buf"
REFRESH = "python scripts/refresh_contract_image.py"
BUF_FOUND_VIOLATIONS = 100
PAYMENT = "sagasuite/payment/v1/payment_service.proto"
INVENTORY = "sagasuite/inventory/v1/inventory_service.proto"
SHIPPING = "sagasuite/shipping/v1/shipping_service.proto"


@pytest.fixture(scope="module")
def buf() -> str:
    """The Buf CLI: the pinned copy under .tools/ first, else one on PATH."""
    if LOCAL_BUF.exists():
        return str(LOCAL_BUF)
    found = shutil.which("buf")
    if found is None:
        pytest.skip("Buf CLI not installed (npm install --prefix .tools @bufbuild/buf)")
    return found


def _run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=120, check=False)


def _breaking(buf: str, root: Path) -> tuple[int, list[dict[str, Any]], str]:
    """`buf breaking` of the contracts under `root` against `root`'s baseline: exit code, violations, output."""
    result = _run(root, buf, "breaking", "--against", str(IMAGE), "--error-format", "json")
    violations = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.returncode, violations, result.stdout + result.stderr


def _described(violations: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  {v['path']}:{v.get('start_line', 0)}:{v.get('start_column', 0)}: {v['message']} ({v['type']})"
        for v in violations
    )


def _contract_files(image: bytes) -> dict[str, bytes]:
    """The project's own files of an image (a FileDescriptorSet on the wire), without Buf's extra metadata."""
    files = descriptor_pb2.FileDescriptorSet.FromString(image)
    files.DiscardUnknownFields()
    return {f.name: f.SerializeToString(deterministic=True) for f in files.file if f.name.startswith("sagasuite/")}


@pytest.fixture
def contracts_copy(tmp_path: Path) -> Path:
    """A copy of the contracts, their Buf configuration and the baseline, to break without touching the tree."""
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "proto", root / "proto", ignore=shutil.ignore_patterns("*.binpb"))
    shutil.copyfile(REPO_ROOT / "buf.yaml", root / "buf.yaml")
    shutil.copyfile(REPO_ROOT / IMAGE, root / IMAGE)
    if LOCAL_BUF.exists():
        (root / ".tools").symlink_to(REPO_ROOT / ".tools")  # the refresh script looks for the pinned Buf there
    return root


def _edit(root: Path, proto: str, old: str, new: str) -> None:
    path = root / "proto" / proto
    source = path.read_text()
    # If the contract changed so that this no longer matches, the test must be rewritten, not pass vacuously.
    assert source.count(old) == 1, f"{proto} no longer contains exactly one {old!r}"
    path.write_text(source.replace(old, new))


# -- the tree against its baseline --------------------------------------------------------------------


def test_the_contracts_have_no_breaking_change_against_the_baseline(buf: str) -> None:
    code, violations, output = _breaking(buf, REPO_ROOT)
    assert code == 0, (
        f"breaking changes to the contracts against {IMAGE} (exit {code}): participants and clients built "
        f"against them would break. Add a new package version instead (sagasuite.<svc>.v2).\n"
        + (_described(violations) or output)
    )


def test_the_baseline_records_the_contracts_of_the_tree(buf: str, tmp_path: Path) -> None:
    """An additive change must be recorded too, or a later removal of what it added would pass unseen."""
    built = tmp_path / "tree.binpb"
    result = _run(REPO_ROOT, buf, "build", "--exclude-source-info", "-o", str(built))
    assert result.returncode == 0, result.stdout + result.stderr
    recorded, current = _contract_files((REPO_ROOT / IMAGE).read_bytes()), _contract_files(built.read_bytes())
    assert recorded, f"{IMAGE} holds no sagasuite/ contract"
    changed = sorted(name for name in recorded.keys() | current.keys() if recorded.get(name) != current.get(name))
    assert not changed, (
        f"the contracts changed since {IMAGE} was recorded: {', '.join(changed)}. "
        f"Run `{REFRESH}` (it refuses breaking changes) and commit the image with the change."
    )


# -- the check catches what it must, and only that -----------------------------------------------------


@pytest.mark.parametrize(
    ("proto", "old", "new", "rule"),
    [
        pytest.param(PAYMENT, "  string payment_token = 3;\n", "", "FIELD_NO_DELETE", id="field-removed"),
        pytest.param(
            PAYMENT, "  string payment_token = 3;", "  bytes payment_token = 3;", "FIELD_SAME_TYPE", id="type-changed"
        ),
        pytest.param(
            SHIPPING, "string tracking_number = 4;", "string tracking_code = 4;", "FIELD_SAME_NAME", id="field-renamed"
        ),
        pytest.param(
            INVENTORY,
            "  rpc ReleaseStock(ReleaseStockRequest) returns (ReleaseStockResponse);\n",
            "",
            "RPC_NO_DELETE",
            id="compensation-rpc-removed",
        ),
    ],
)
def test_a_breaking_change_to_a_participant_contract_is_detected(
    buf: str, contracts_copy: Path, proto: str, old: str, new: str, rule: str
) -> None:
    assert _breaking(buf, contracts_copy)[0] == 0, "the untouched copy must pass"
    _edit(contracts_copy, proto, old, new)
    code, violations, output = _breaking(buf, contracts_copy)
    assert code == BUF_FOUND_VIOLATIONS, output
    assert rule in {violation["type"] for violation in violations}, output
    assert {violation["path"] for violation in violations} == {f"proto/{proto}"}, output


def test_an_additive_change_is_not_breaking(buf: str, contracts_copy: Path) -> None:
    _edit(
        contracts_copy,
        PAYMENT,
        "  string payment_token = 3;\n",
        "  string payment_token = 3;\n  // Free text for the statement; optional.\n  string statement_note = 4;\n",
    )
    code, violations, output = _breaking(buf, contracts_copy)
    assert (code, violations) == (0, []), output


def test_the_refresh_script_refuses_a_breaking_change_unless_told(buf: str, contracts_copy: Path) -> None:
    def refresh(*flags: str) -> subprocess.CompletedProcess[str]:
        script = REPO_ROOT / "scripts" / "refresh_contract_image.py"
        return _run(contracts_copy, sys.executable, str(script), "--root", str(contracts_copy), *flags)

    baseline = (contracts_copy / IMAGE).read_bytes()
    _edit(contracts_copy, PAYMENT, "  string payment_token = 3;\n", "")
    refused = refresh()
    assert refused.returncode == 1
    assert "payment_token" in refused.stderr and "refusing to record breaking changes" in refused.stderr
    assert (contracts_copy / IMAGE).read_bytes() == baseline, "a refused refresh must leave the baseline as it was"

    recorded = refresh("--allow-breaking")
    assert recorded.returncode == 0, recorded.stderr
    assert (contracts_copy / IMAGE).read_bytes() != baseline
    assert _breaking(buf, contracts_copy)[0] == 0, "the new baseline is the tree"
    again = refresh()
    assert again.returncode == 0 and "already records these contracts" in again.stderr
