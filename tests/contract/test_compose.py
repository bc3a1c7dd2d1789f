"""Docker cannot run here, so compose.yaml, compose.tls.yaml and the Dockerfile are checked by reading them."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from ruamel.yaml import YAML

from svckit.discovery import SUITE_SERVICES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ("compose.yaml", "compose.tls.yaml")
ORCHESTRATOR = "orchestrator"
SUITE = (*SUITE_SERVICES, ORCHESTRATOR)
# Read by the OpenTelemetry SDK itself rather than by our code; they belong in compose all the same.
SDK_PREFIXES = ("OTEL_",)
# Built at run time from the service names (svckit/discovery.py, StaticResolver.from_env).
# The system's own variables (the CLI's fallback operator name, terminal width) are not ours to document.
SYSTEM_VARIABLES = frozenset({"USER", "COLUMNS", "LINES", "HOME", "PATH", "TERM", "NO_COLOR"})
# Benchmarks pass variables to their own child processes; they are not settings of the suite.
NOT_SCANNED = ("sagasuite", "bench")
DYNAMIC_VARIABLES = frozenset(f"{service.upper()}_ADDR" for service in SUITE_SERVICES)
_ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


def load_yaml(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = YAML(typ="safe").load((ROOT / name).read_text())
    return loaded


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml("compose.yaml")


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found: dict[str, str] = pyproject["project"]["scripts"]
    return found


def suite_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the project's image (the others are Consul, Jaeger and PostgreSQL)."""
    return {name: spec for name, spec in compose["services"].items() if "build" in spec}


def environment(spec: dict[str, Any]) -> dict[str, str]:
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


# -- the files are valid compose files ---------------------------------------------------------------


def test_the_compose_files_match_the_compose_specification() -> None:
    tool = Path(sys.executable).with_name("check-jsonschema")
    command = str(tool) if tool.exists() else shutil.which("check-jsonschema")
    assert command, "check-jsonschema is a dev dependency: pip install -e '.[dev]'"
    result = subprocess.run(
        [command, "--builtin-schema", "vendor.compose-spec", *COMPOSE_FILES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_tls_overlay_only_adds_to_services_of_compose_yaml(compose: dict[str, Any]) -> None:
    overlay = load_yaml("compose.tls.yaml")
    assert set(overlay["services"]) <= set(compose["services"])
    for name in SUITE:
        env = environment(overlay["services"][name])
        assert env["TLS_CERT_FILE"] and env["TLS_KEY_FILE"], name
        assert env["TLS_SERVER_NAME"] == "sagasuite.internal", name
        mounted = [volume.split(":")[1] for volume in overlay["services"][name]["volumes"]]
        assert all(value.startswith(tuple(mounted)) for key, value in env.items() if key.endswith("_FILE")), name
    # The services insist on client certificates; the orchestrator presents one to them.
    assert all(environment(overlay["services"][name])["TLS_CLIENT_CA_FILE"] for name in SUITE_SERVICES)
    assert environment(overlay["services"][ORCHESTRATOR])["TLS_CLIENT_CERT_FILE"]


# -- one image, one console script per process --------------------------------------------------------


def test_every_container_runs_a_console_script_of_the_project(compose: dict[str, Any], scripts: dict[str, str]) -> None:
    services = suite_services(compose)
    assert set(services) == set(SUITE)
    commands = {name: spec["command"][0] for name, spec in services.items()}
    assert commands == {
        "inventory": "inventory-svc",
        "payment": "payment-svc",
        "shipping": "shipping-svc",
        "notify": "notify-svc",
        "orchestrator": "sagasuite-orchestrator",
    }
    assert set(commands.values()) <= set(scripts), "a compose command is not in [project.scripts]"
    probes = {spec["healthcheck"]["test"][1] for spec in services.values()}
    assert probes == {"sagasuite-healthcheck"} and probes <= set(scripts)
    assert len({spec["image"] for spec in services.values()}) == 1, "one image for every process"


def test_the_dockerfile_builds_one_image_that_runs_as_a_user_without_an_entry_point() -> None:
    instructions = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert [line for line in instructions if line.startswith("FROM ")] == ["FROM python:3.11-slim"]
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert instructions.count("ENTRYPOINT []") == 1
    copied = {line.split()[1] for line in instructions if line.startswith("COPY ")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = {p for p in packages if (ROOT / p / "__init__.py").exists() and p != "bench"}
    assert needed <= copied, f"packages not copied into the image: {sorted(needed - copied)}"
    assert any("pip install" in line and " ." in line for line in instructions)


# -- the topology ---------------------------------------------------------------------------------


def test_each_service_has_its_own_database_and_the_orchestrator_replicas_share_one(compose: dict[str, Any]) -> None:
    init_sql = (ROOT / "deploy" / "postgres-init.sql").read_text()
    created = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", init_sql))
    mounted = [v.split(":")[0] for v in compose["services"]["postgres"]["volumes"]]
    assert "./deploy/postgres-init.sql" in mounted
    databases = {}
    for name, spec in suite_services(compose).items():
        url = urlsplit(environment(spec)["DATABASE_URL"])
        assert url.scheme == "postgresql+psycopg" and url.hostname == "postgres", name
        database = url.path.lstrip("/")
        assert created.get(database) == url.username, f"{name}: {database} is not created for {url.username}"
        databases[name] = database
    assert len(set(databases.values())) == len(databases), "two services share a database"
    assert compose["services"][ORCHESTRATOR]["deploy"]["replicas"] == 2


def test_the_services_can_be_scaled_and_are_found_through_consul(compose: dict[str, Any]) -> None:
    for name, spec in suite_services(compose).items():
        env = environment(spec)
        assert (env["DISCOVERY"], env["CONSUL_HTTP_ADDR"]) == ("consul", "consul:8500"), name
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317", name
        assert env["HOST"] == "0.0.0.0", f"{name} must listen beyond its loopback"
        assert "container_name" not in spec, f"{name}: a fixed container name prevents --scale"
        if name in SUITE_SERVICES:
            assert "ports" not in spec, f"{name}: a fixed host port prevents --scale"
    # Two replicas publish one host port each from the range.
    (published,) = compose["services"][ORCHESTRATOR]["ports"]
    assert published.startswith("50050-50051:")


def test_every_dependency_waits_for_a_health_check_that_exists(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, spec in services.items():
        assert "healthcheck" in spec, f"{name} has no health check"
        for dependency, condition in (spec.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}'s missing check"
    waits = {d for d, c in services[ORCHESTRATOR]["depends_on"].items() if c["condition"] == "service_healthy"}
    assert waits >= {"postgres", "consul", *SUITE_SERVICES}


# -- environment variables: read by the code, set by compose, documented in the README ---------------------


def _module_constants(trees: list[ast.Module]) -> dict[str, str]:
    constants: dict[str, str] = {}
    for tree in trees:
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                for target in node.targets:
                    if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                        constants[target.id] = node.value.value
    return constants


def _source_files() -> Iterator[Path]:
    """The project's own packages (those pyproject installs), without generated code and benchmarks."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        if package not in NOT_SCANNED and (ROOT / package).is_dir():
            yield from sorted((ROOT / package).rglob("*.py"))


def _is_environment(node: ast.expr) -> bool:
    """`os.environ`, `environ`, `env` and the like: the mapping a variable is read from."""
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name in ("environ", "env", "environment")


def _string(node: ast.expr | None, constants: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    if isinstance(node, ast.Attribute):
        return constants.get(node.attr)
    return None


def _settings_fields(trees: list[ast.Module]) -> set[str]:
    """Fields of every pydantic settings class (subclasses of BaseSettings, by name, transitively)."""
    classes = {node.name: node for tree in trees for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    settings = {"BaseSettings"}
    changed = True
    while changed:
        changed = False
        for name, node in classes.items():
            bases = {
                b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in node.bases
            }
            if name not in settings and bases & settings:
                settings.add(name)
                changed = True
    fields = set()
    for name in settings - {"BaseSettings"}:
        for statement in classes[name].body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                field = statement.target.id
                if field != "model_config" and not field.startswith("_"):
                    fields.add(field.upper())
    return fields


def variables_the_code_reads() -> dict[str, str]:
    """Every environment variable the code reads, with where: settings fields and direct reads."""
    files = list(_source_files())
    trees = [ast.parse(path.read_text(), str(path)) for path in files]
    constants = _module_constants(trees)
    found: dict[str, str] = dict.fromkeys(_settings_fields(trees), "a settings field")
    for path, tree in zip(files, trees, strict=True):
        where = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            name: str | None = None
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Attribute) and func.attr in ("get", "pop") and _is_environment(func.value):
                    name = _string(node.args[0] if node.args else None, constants)
                elif isinstance(func, ast.Attribute) and func.attr == "getenv":
                    name = _string(node.args[0] if node.args else None, constants)
                for keyword in node.keywords:
                    if keyword.arg == "envvar":  # typer/click options read from the environment
                        value = _string(keyword.value, constants)
                        if value and value not in SYSTEM_VARIABLES:
                            found.setdefault(value, where)
            elif isinstance(node, ast.Subscript) and _is_environment(node.value):
                name = _string(node.slice, constants)
            if name and _ENV_NAME.match(name) and name not in SYSTEM_VARIABLES:
                found.setdefault(name, where)
    for name in DYNAMIC_VARIABLES:
        found.setdefault(name, "svckit/discovery.py (<SERVICE>_ADDR)")
    return found


def test_the_collector_finds_the_kinds_of_reads_the_code_has() -> None:
    """Guards the scan itself: one variable of each kind must be found."""
    found = variables_the_code_reads()
    for name in ("DATABASE_URL", "OPERATOR_TOKENS_FILE", "CONSUL_HTTP_ADDR", "OTEL_TRACES_EXPORTER", "PAYMENT_ADDR"):
        assert name in found, name


def test_compose_sets_only_variables_the_code_reads(compose: dict[str, Any]) -> None:
    known = set(variables_the_code_reads())
    for file_name in COMPOSE_FILES:
        services = load_yaml(file_name)["services"]
        for name in SUITE:
            for variable in environment(services.get(name, {})):
                assert variable in known or variable.startswith(SDK_PREFIXES), (
                    f"{file_name}: {name} sets {variable}, which nothing reads (a typo?)"
                )


def _readme_words() -> set[str]:
    readme = ROOT / "README.md"
    return set(re.findall(r"[A-Z][A-Z0-9_]+", readme.read_text())) if readme.exists() else set()


def test_every_variable_the_code_reads_is_documented_in_the_readme() -> None:
    documented = _readme_words()
    missing = {name: where for name, where in variables_the_code_reads().items() if name not in documented}
    assert not missing, "not in README.md:\n" + "\n".join(f"  {n} ({w})" for n, w in sorted(missing.items()))


def test_every_variable_compose_sets_is_documented_in_the_readme() -> None:
    documented = _readme_words()
    missing = set()
    for file_name in COMPOSE_FILES:
        for spec in load_yaml(file_name)["services"].values():
            missing |= {variable for variable in environment(spec) if variable not in documented}
    # The images' own settings (POSTGRES_*, COLLECTOR_*) are documented by their images.
    missing = {name for name in missing if not name.startswith(("POSTGRES_", "COLLECTOR_"))}
    assert not missing, f"set in compose but not in README.md: {sorted(missing)}"
