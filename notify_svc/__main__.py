"""Entry point: `python -m notify_svc` or the `notify-svc` console script."""

from __future__ import annotations

from notify_svc.config import NotifySettings
from notify_svc.server import build_process
from svckit.config import load_settings


def main() -> None:
    build_process(load_settings(NotifySettings)).run()


if __name__ == "__main__":
    main()
