"""Docker cannot run here, so compose.yaml, compose.tls.yaml and the Dockerfile are checked by reading them."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ruamel.yaml import YAML

from devstack.devcerts import COMPOSE_NAMES
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


def test_consul_s_tls_checks_verify_a_name_the_shared_certificate_carries() -> None:
    """Since Consul 1.17 a TLS check verifies its TLSServerName only: the agent's server_name is not used."""
    overlay = load_yaml("compose.tls.yaml")
    for name in SUITE:
        server_name = environment(overlay["services"][name])["CONSUL_CHECK_TLS_SERVER_NAME"]
        # The certificate devcerts issues for every process (internal.pem) names these; not the container IPs.
        assert server_name in COMPOSE_NAMES, f"{name}: {server_name!r} is not a name of internal.pem"
    agent = " ".join(overlay["services"]["consul"]["command"])
    assert "enable_agent_tls_for_checks = true" in agent
    assert "server_name" not in agent, "server_name does not reach the checks: TLSServerName does"


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


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, one a line (continuations joined, comments dropped)."""
    return [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_the_dockerfile_builds_one_image_that_runs_as_a_user_without_an_entry_point() -> None:
    instructions = dockerfile_instructions()
    assert [line for line in instructions if line.startswith("FROM ")] == ["FROM python:3.11-slim"]
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert instructions.count("ENTRYPOINT []") == 1
    # What the image holds, and whether each command can start from it: see the image tests below.
    assert any("pip install" in line and " ." in line for line in instructions)


# -- what the image holds: every command it runs starts from its files alone -----------------------------
#
# The image is rebuilt here without Docker: the files the Dockerfile's COPY lines take from the build
# context (minus .dockerignore), the packages `pip install --no-deps .` makes of them, and the runtime
# dependencies only. Each command then starts in a child interpreter that sees nothing else.

_NOT_RUNTIME_HINT = "is installed here but is not a runtime dependency, so the image does not have it"

# Runs in the child (python -I -S): the image's packages, then site-packages with only runtime dependencies.
_IMAGE_INTERPRETER = f"""
import importlib, importlib.abc, json, sys
config = json.loads(sys.argv[1])
sys.path[:0] = [config["image"]]
sys.path.extend(config["site_packages"])


class NotInTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        top = fullname.partition(".")[0]
        if top in config["blocked"]:
            raise ModuleNotFoundError(
                f"No module named {{fullname!r}} ({{config['blocked'][top]}} {_NOT_RUNTIME_HINT})", name=fullname
            )
        return None


sys.meta_path.insert(0, NotInTheImage())
module, _, attribute = config["entry_point"].partition(":")
target = importlib.import_module(module)
for part in attribute.split("."):
    target = getattr(target, part)
if config["argv"] is not None:
    sys.argv = [config["script"], *config["argv"]]
    sys.exit(target())
"""


def _dockerignore_rule(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax, anchored at the context root: `**` spans folders, `*` and `?` do not."""
    parts = re.split(r"(\*\*/?|\*|\?)", PurePosixPath("/" + pattern).as_posix().lstrip("/"))
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcards.get(part, re.escape(part)) for part in parts))


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, pattern) per .dockerignore line, in order: the last matching line decides."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            excluded = not line.startswith("!")
            rules.append((excluded, _dockerignore_rule(line.removeprefix("!"))))
    return rules


def _in_build_context(relative: PurePosixPath, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the file reaches the build context: a pattern that matches a parent folder excludes it too."""
    candidates = [str(parent) for parent in reversed(relative.parents) if str(parent) != "."] + [str(relative)]
    excluded = False
    for excludes, rule in rules:
        if any(rule.fullmatch(candidate) for candidate in candidates):
            excluded = excludes
    return not excluded


def _copy_into_image(sources: list[str], destination: str, workdir: PurePosixPath, filesystem: Path) -> None:
    """One COPY instruction: files and folders of the context (their contents, for folders) to destination."""
    rules = _dockerignore()
    target = filesystem / (workdir / destination).relative_to("/")
    # As Docker reads it: a destination ending in "/" (or the WORKDIR itself) is a folder.
    into_folder = len(sources) > 1 or destination.endswith("/") or destination == "." or (ROOT / sources[0]).is_dir()
    for source in sources:
        for found in sorted(ROOT.glob(source)):
            files = [found] if found.is_file() else sorted(p for p in found.rglob("*") if p.is_file())
            for path in files:
                relative = PurePosixPath(path.relative_to(ROOT).as_posix())
                if not _in_build_context(relative, rules):
                    continue
                inside = path.relative_to(found) if found.is_dir() else Path(path.name)
                placed = target / inside if into_folder else target
                placed.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, placed)


def build_image_filesystem(filesystem: Path) -> Path:
    """Run the Dockerfile's WORKDIR and COPY lines into `filesystem`; returns the folder pip installs from."""
    workdir = PurePosixPath("/")
    installed_from: Path | None = None
    for instruction in dockerfile_instructions():
        keyword, _, rest = instruction.partition(" ")
        if keyword == "WORKDIR":
            workdir = workdir / rest.strip()
        elif keyword == "COPY":
            words = json.loads(rest) if rest.lstrip().startswith("[") else shlex.split(rest)
            assert not any(word.startswith("--from") for word in words), "COPY --from is not modelled here"
            *sources, destination = [word for word in words if not word.startswith("--")]
            _copy_into_image(sources, destination, workdir, filesystem)
        elif keyword == "RUN" and re.search(r"pip install [^&;]*--no-deps \.", rest) and installed_from is None:
            installed_from = filesystem / workdir.relative_to("/")
    assert installed_from is not None, "the Dockerfile no longer runs `pip install --no-deps .`"
    return installed_from


def _find_packages(project: Path, include: list[str]) -> list[str]:
    """setuptools' find_packages: folders with an __init__.py, reached through such folders, named by a pattern."""
    found, pending = [], [path for path in sorted(project.iterdir()) if path.is_dir()]
    while pending:
        folder = pending.pop()
        if "." in folder.name or not (folder / "__init__.py").is_file():
            continue
        dotted = ".".join(folder.relative_to(project).parts)
        if any(fnmatchcase(dotted, pattern) for pattern in include):
            found.append(dotted)
        pending += [path for path in sorted(folder.iterdir()) if path.is_dir()]
    return found


def install_packages(project: Path, site: Path) -> list[str]:
    """What `pip install --no-deps .` puts in site-packages: the packages pyproject finds, with their data."""
    setuptools_config = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_data: list[str] = setuptools_config.get("package-data", {}).get("*", [])
    packages = _find_packages(project, setuptools_config["packages"]["find"]["include"])
    for package in packages:
        folder = project / package.replace(".", "/")
        for path in folder.iterdir():
            if path.is_file() and (path.suffix == ".py" or any(fnmatchcase(path.name, p) for p in package_data)):
                placed = site / path.relative_to(project)
                placed.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, placed)
    return sorted(packages)


def _runtime_distributions() -> set[str]:
    """The project's dependencies and theirs (extras only where a requirement asks for them)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pending = [Requirement(text) for text in pyproject["project"]["dependencies"]]
    found: set[str] = set()
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        key = name + "".join(f"[{extra}]" for extra in sorted(requirement.extras))
        if key in found:
            continue
        found |= {key, name}
        environments = [{"extra": extra} for extra in ["", *requirement.extras]]
        for text in importlib.metadata.distribution(name).requires or []:
            dependency = Requirement(text)
            if dependency.marker is None or any(dependency.marker.evaluate(env) for env in environments):
                pending.append(dependency)
    return {name for name in found if "[" not in name}


def _top_level_modules(distribution: importlib.metadata.Distribution) -> set[str]:
    names = set()
    for file in distribution.files or []:
        first = file.parts[0]
        if first in ("..", "__pycache__") or first.endswith((".dist-info", ".egg-info", ".pth", ".data")):
            continue
        names.add(first.split(".")[0] if len(file.parts) == 1 else first)
    return names


def modules_not_in_the_image() -> dict[str, str]:
    """Top-level modules installed here only for development or benchmarks, each with its distribution."""
    runtime = _runtime_distributions()
    provided: dict[str, set[str]] = {}
    for distribution in importlib.metadata.distributions():
        name = canonicalize_name(distribution.metadata["Name"])
        if name != "sagasuite":  # the project itself: what the image has of it is the rebuilt file set
            for module in _top_level_modules(distribution):
                provided.setdefault(module, set()).add(name)
    return {module: ", ".join(sorted(names)) for module, names in provided.items() if not names & runtime and module}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The image's project packages in a folder, and what the child interpreter needs to see only them."""
    root = tmp_path_factory.mktemp("image")
    project = build_image_filesystem(root / "filesystem")
    site = root / "site-packages"
    packages = install_packages(project, site)
    paths = sysconfig.get_paths()
    return {
        "image": str(site),
        "packages": packages,
        "site_packages": list(dict.fromkeys([paths["purelib"], paths["platlib"]])),
        "blocked": modules_not_in_the_image(),
        "cwd": root,
    }


def run_in_image(image: dict[str, Any], script: str, entry_point: str, argv: list[str] | None = None) -> Any:
    """Import a console script's entry point (and call it with argv, when given) seeing only the image."""
    config = {**{k: v for k, v in image.items() if k not in ("cwd", "packages")}, "entry_point": entry_point}
    config |= {"script": script, "argv": argv}
    environment = {"PATH": os.environ.get("PATH", ""), "HOME": str(image["cwd"]), "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", _IMAGE_INTERPRETER, json.dumps(config)],
        cwd=image["cwd"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def commands_the_image_runs(compose: dict[str, Any]) -> dict[str, list[str]]:
    """Each container's command, each health probe and the image's default command (its CMD)."""
    commands = {}
    for file_name in COMPOSE_FILES:
        for name, spec in load_yaml(file_name)["services"].items():
            if "command" in spec and (name in SUITE or "build" in spec):
                commands[f"{file_name}: {name}"] = list(spec["command"])
            test = (spec.get("healthcheck") or {}).get("test")
            if isinstance(test, list) and test[:1] == ["CMD"] and name in SUITE:
                commands[f"{file_name}: {name} healthcheck"] = test[1:]
    for instruction in dockerfile_instructions():
        if instruction.startswith("CMD "):
            commands["Dockerfile CMD"] = json.loads(instruction.removeprefix("CMD "))
    return commands


def test_the_rebuilt_image_has_the_project_packages_but_not_what_dockerignore_leaves_out(image: dict[str, Any]) -> None:
    site = Path(image["image"])
    assert {"orchestrator", "svckit", "inventory_svc", "sagasuite.orchestrator.v1"} <= set(image["packages"])
    assert "bench" not in image["packages"] and not (site / "bench").exists()
    assert not list(site.rglob("__pycache__")) and not list(site.rglob("*.db"))
    assert (site / "inventory_svc" / "catalogue.json").is_file(), "package data is installed too"
    # Development-only distributions are kept from the child; runtime ones are not.
    assert {"pytest", "hypothesis", "cryptography"} <= set(image["blocked"])
    assert not {"grpc", "typer", "rich", "sqlalchemy", "pydantic"} & set(image["blocked"])


def test_the_image_check_refuses_what_the_image_lacks(image: dict[str, Any]) -> None:
    """Guards the check itself: a module outside the image's files, and a development-only one, do not import."""
    left_out = run_in_image(image, "bench", "bench.cli:bench_command")
    assert left_out.returncode != 0 and "No module named 'bench'" in left_out.stderr, left_out.stderr
    dev_only = run_in_image(image, "devcerts", "devstack.devcerts:make_ca")
    assert dev_only.returncode != 0 and "No module named 'cryptography'" in dev_only.stderr, dev_only.stderr
    assert _NOT_RUNTIME_HINT in dev_only.stderr


def test_every_command_the_image_runs_starts_from_the_image_alone(
    compose: dict[str, Any], scripts: dict[str, str], image: dict[str, Any]
) -> None:
    commands = commands_the_image_runs(compose)
    assert {"Dockerfile CMD", "compose.yaml: orchestrator", "compose.yaml: payment healthcheck"} <= set(commands)
    places: dict[tuple[str, ...], list[str]] = {}
    for place, command in commands.items():
        assert command[0] in scripts, f"{place}: {command[0]} is not a console script of the project"
        places.setdefault(tuple(command), []).append(place)
    failures = []
    for (script, *argv), where in places.items():
        # The servers would serve forever: importing their entry point is what they do at startup
        # before reading settings. The CLI is run for real, with the arguments the image gives it.
        run = run_in_image(image, script, scripts[script], argv if script == "saga" else None)
        if run.returncode != 0:
            failures.append(f"{shlex.join([script, *argv])} ({', '.join(where)}) exits {run.returncode}:\n{run.stderr}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("command", ["bench", "chaos"])
def test_saga_commands_whose_package_the_image_leaves_out_say_so_in_one_line(
    command: str, scripts: dict[str, str], image: dict[str, Any]
) -> None:
    listed = run_in_image(image, "saga", scripts["saga"], ["--help"])
    assert listed.returncode == 0 and command in listed.stdout, listed.stderr
    run = run_in_image(image, "saga", scripts["saga"], [command, "--help"])
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith(f"saga: error: saga {command} needs the 'bench' package"), run.stderr


def test_saga_version_prints_the_installed_version(scripts: dict[str, str], image: dict[str, Any]) -> None:
    run = run_in_image(image, "saga", scripts["saga"], ["--version"])
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"sagasuite {importlib.metadata.version('sagasuite')}\n"


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


def test_every_image_compose_pulls_is_pinned_to_a_version(compose: dict[str, Any]) -> None:
    for file_name in COMPOSE_FILES:
        for name, spec in load_yaml(file_name)["services"].items():
            if "image" not in spec or "build" in spec or name in SUITE:
                continue
            repository, _, tag = spec["image"].rpartition(":")
            assert repository and "/" not in tag, f"{file_name}: {name} pulls {spec['image']} without a tag"
            assert tag != "latest" and re.search(r"\d", tag), (
                f"{file_name}: {name} pulls {spec['image']}, not a version"
            )


# -- metrics: Prometheus scrapes every suite process, Grafana is provisioned from deploy/ ------------------


def _mounts(spec: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a service: its container path for each host path under the project."""
    return {volume.split(":")[0]: volume.split(":")[1] for volume in spec.get("volumes", []) if volume.startswith("./")}


def test_prometheus_scrapes_every_suite_process_at_its_metrics_port(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    mounts = _mounts(prometheus)
    assert mounts.get("./deploy/prometheus/prometheus.yml") == "/etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = load_yaml("deploy/prometheus/prometheus.yml")
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        assert job.get("scheme", "http") == "http" and job.get("metrics_path", "/metrics") == "/metrics", job
        for discovery in job.get("dns_sd_configs", []):
            # Type A: every container of a scaled service, every orchestrator replica, is a target of its own.
            assert discovery["type"] == "A", job["job_name"]
            scraped.update(dict.fromkeys(discovery["names"], int(discovery["port"])))
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                scraped[host] = int(port)
    ports = {name: int(environment(spec)["METRICS_PORT"]) for name, spec in suite_services(compose).items()}
    assert all(port > 0 for port in ports.values()), ports
    assert {name: scraped.get(name) for name in ports} == ports, "every suite process is scraped at its METRICS_PORT"
    for name, spec in suite_services(compose).items():
        assert str(ports[name]) in [str(port) for port in spec["expose"]], f"{name} does not expose its metrics port"
    # The processes put `service` on their RPC series: a target label of that name would rename theirs.
    relabelled = {
        rule.get("target_label") for job in config["scrape_configs"] for rule in job.get("relabel_configs", [])
    }
    assert "service" not in relabelled


def test_grafana_is_provisioned_from_deploy_and_waits_for_prometheus(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    assert _mounts(grafana) == {
        "./deploy/grafana/provisioning": "/etc/grafana/provisioning",
        "./deploy/grafana/dashboards": "/etc/grafana/dashboards",
    }
    assert all((ROOT / path).is_dir() for path in _mounts(grafana)), "a mounted folder is missing"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert "3000:3000" in grafana["ports"] and "9090:9090" in compose["services"]["prometheus"]["ports"]
    # A dashboard a visitor can open without an account, changed only by editing deploy/.
    env = environment(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


# -- environment variables: read by the code, set by compose, documented in README.md or docs/ -------------


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


# A variable is documented where a table row names it, in backticks, in its first cell: a row gives it a
# default and a meaning. A name that only appears in prose or in an example does not count.
_FIRST_CELL = re.compile(r"^\s*\|([^|]*)\|")
_CODE_NAME = re.compile(r"`([A-Z][A-Z0-9_]+)`")


def documentation_files() -> list[Path]:
    """The front page and every page under docs/: where the settings are documented."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def table_variables(markdown: str) -> set[str]:
    """Names in backticks in the first cell of a table row, outside fenced code blocks."""
    names: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and (cell := _FIRST_CELL.match(line)):
            names |= set(_CODE_NAME.findall(cell.group(1)))
    return names


def documented_variables() -> dict[str, str]:
    """Every documented variable, with the first page (relative to the repository) whose table names it."""
    documented: dict[str, str] = {}
    for path in documentation_files():
        for name in sorted(table_variables(path.read_text())):
            documented.setdefault(name, str(path.relative_to(ROOT)))
    return documented


def test_the_documentation_check_counts_table_rows_only() -> None:
    """Guards the check itself: a first cell counts; prose, other cells and code blocks do not."""
    sample = "\n".join(
        [
            "`IN_PROSE` is mentioned here, and IN_PLAIN_TEXT too.",
            "| variable | default | meaning |",
            "|---|---|---|",
            "| `FIRST`, `SECOND` (and `_TRACES_` forms) | `OTHER_CELL` | see `ALSO_OTHER` |",
            "```sh",
            "| `IN_A_CODE_BLOCK` | x |",
            "```",
            "  | `INDENTED_ROW` | y |",
        ]
    )
    assert table_variables(sample) == {"FIRST", "SECOND", "INDENTED_ROW"}
    pages = {str(path.relative_to(ROOT)) for path in documentation_files()}
    assert {"README.md", "docs/configuration.md", "docs/cli.md"} <= pages, sorted(pages)
    assert {"CONSUL_HTTP_ADDR", "MAX_WATCHERS"} <= table_variables((ROOT / "docs/configuration.md").read_text())
    assert "SAGA_ADDRESS" in table_variables((ROOT / "docs/cli.md").read_text())


def _not_documented(names: dict[str, str]) -> str:
    return (
        "not named in the first column of a table in README.md or docs/*.md (add a row to docs/configuration.md):\n"
        + "\n".join(f"  {name} ({where})" for name, where in sorted(names.items()))
    )


def test_every_variable_the_code_reads_is_documented() -> None:
    documented = documented_variables()
    missing = {name: where for name, where in variables_the_code_reads().items() if name not in documented}
    assert not missing, _not_documented(missing)


def test_every_variable_compose_sets_is_documented() -> None:
    documented = documented_variables()
    missing: dict[str, str] = {}
    for file_name in COMPOSE_FILES:
        for service, spec in load_yaml(file_name)["services"].items():
            for variable in environment(spec):
                if variable not in documented:
                    missing.setdefault(variable, f"{file_name}: {service}")
    # The images' own settings (POSTGRES_*, COLLECTOR_*, Grafana's GF_*) are documented by their images.
    missing = {
        name: where for name, where in missing.items() if not name.startswith(("POSTGRES_", "COLLECTOR_", "GF_"))
    }
    assert not missing, _not_documented(missing)
