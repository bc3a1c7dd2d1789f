"""The local stack: four services and an orchestrator as child processes on loopback, SQLite by default."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devstack.launcher import ManagedProcess
from svckit.discovery import SUITE_SERVICES

__all__ = ["SERVICES", "LocalStack", "StackConfig"]

# Discovery name -> Python module that runs the service (each suite service's package is <name>_svc).
SERVICES = {name: f"{name}_svc" for name in SUITE_SERVICES}


@dataclass
class StackConfig:
    """Where the stack keeps its files and how each process is configured."""

    data_dir: Path
    orchestrator_port: int = 0
    orchestrator_database_url: str = ""
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    orchestrator_env: dict[str, str] = field(default_factory=dict)
    common_env: dict[str, str] = field(default_factory=dict)
    # Fixed ports by service name (e.g. {"inventory": 50051}); a service not named gets a free port.
    service_ports: dict[str, int] = field(default_factory=dict)
    # Instances by service name (e.g. {"inventory": 2}); 1 when not named. The extra instances
    # ("inventory-2", ...) get the first one's settings, so they share its database, and the
    # orchestrator is given every address of the service for static discovery.
    instances: dict[str, int] = field(default_factory=dict)
    # Settings of one extra instance over the first one's, by instance name (e.g. {"inventory-2": {...}}).
    instance_env: dict[str, dict[str, str]] = field(default_factory=dict)


class LocalStack:
    """Starts the services first, then the orchestrator pointed at them by static discovery."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        # The first instance of each service; `instances` holds them all, the first one first.
        self.services: dict[str, ManagedProcess] = {}
        self.instances: dict[str, list[ManagedProcess]] = {}
        self.orchestrator: ManagedProcess | None = None

    def _env(self, name: str, extra: Mapping[str, str]) -> dict[str, str]:
        return {
            "HOST": "127.0.0.1",
            "PORT": "0",
            "DATA_DIR": str(self.config.data_dir / name),
            **self.config.common_env,
            **extra,
        }

    def start(self, timeout: float = 60.0) -> LocalStack:
        log_dir = self.config.data_dir / "logs"
        for name, module in SERVICES.items():
            port = {"PORT": str(self.config.service_ports[name])} if name in self.config.service_ports else {}
            env = self._env(name, {**port, **self.config.service_env.get(name, {})})
            process = ManagedProcess(name, module, env, log_dir)
            self.services[name] = process
            self.instances[name] = [process]
            for n in range(2, self.config.instances.get(name, 1) + 1):
                extra = f"{name}-{n}"
                extra_env = {**env, "PORT": "0", **self.config.instance_env.get(extra, {})}
                self.instances[name].append(ManagedProcess(extra, module, extra_env, log_dir))
        try:
            # The services start side by side: a stack is up in the time of its slowest process.
            for process in self._service_processes():
                process.launch()
            for process in self._service_processes():
                process.wait_ready(timeout)
            orchestrator_env = self._env("orchestrator", self.config.orchestrator_env)
            orchestrator_env["PORT"] = str(self.config.orchestrator_port)
            if self.config.orchestrator_database_url:
                orchestrator_env["DATABASE_URL"] = self.config.orchestrator_database_url
            for name, instances in self.instances.items():
                orchestrator_env[f"{name.upper()}_ADDR"] = ",".join(p.address for p in instances)
            self.orchestrator = ManagedProcess("orchestrator", "orchestrator", orchestrator_env, log_dir)
            self.orchestrator.start(timeout)
        except Exception:
            self.stop()
            raise
        return self

    @property
    def address(self) -> str:
        assert self.orchestrator is not None
        return self.orchestrator.address

    def _service_processes(self) -> list[ManagedProcess]:
        return [process for instances in self.instances.values() for process in instances]

    def processes(self) -> dict[str, ManagedProcess]:
        named = {process.name: process for process in self._service_processes()}
        if self.orchestrator is not None:
            named["orchestrator"] = self.orchestrator
        return named

    def add_orchestrator(self, name: str, extra_env: Mapping[str, str] | None = None) -> ManagedProcess:
        """Start one more orchestrator replica beside the first, with the same settings."""
        assert self.orchestrator is not None
        # The first replica's REPLICA_ID is not inherited (two replicas must never share one);
        # one given in extra_env is kept.
        env = {**self.orchestrator.env, "PORT": "0"}
        env.pop("REPLICA_ID", None)
        env.update(extra_env or {})
        replica = ManagedProcess(name, "orchestrator", env, self.config.data_dir / "logs")
        return replica.start()

    def stop(self) -> None:
        if self.orchestrator is not None:
            self.orchestrator.stop()
        for process in self._service_processes():
            process.stop()

    def __enter__(self) -> LocalStack:
        # A stack started already (start_stack() returns one) is entered as it is, never started twice.
        return self if self.orchestrator is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
