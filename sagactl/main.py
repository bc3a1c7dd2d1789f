"""The `saga` entry point: answers --version before the command tree (typer, rich, grpc) is imported."""

from __future__ import annotations

import sys

__all__ = ["installed_version", "main"]


def installed_version() -> str:
    """The installed sagasuite distribution's version, or a note that it is not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("sagasuite")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed as a package)"


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        print(f"sagasuite {installed_version()}")
        return
    from sagactl.app import main as run_app

    run_app()


if __name__ == "__main__":
    main()
