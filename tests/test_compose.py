"""The production stack: docker-compose.yml and the Dockerfile agree with the code they run.

No Docker here: the files are read as data and checked against the real settings classes and the
real ``lethe`` argument parser, so a renamed setting, subcommand or flag fails these tests.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from service.cli import build_parser
from service.config import Settings, UnlearnSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

LETHE_SERVICES = ("api", "worker", "sweeper", "migrate")
LONG_RUNNING_LETHE = ("api", "worker", "sweeper")
GPU_WORKERS = ("worker",)
# The variables boto3 reads from the environment that the stack may set.
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"}
COMPILERS = re.compile(r"\b(gcc|g\+\+|cc|clang|build-essential|make)\b")


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` / ``$$``, resolved with the defaults only."""
    value = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
    return value.replace("$$", "$")


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE form
        env = dict(item.partition("=")[::2] for item in env)
    return {key: interpolate(str(value)) for key, value in env.items()}


def settings_variables(cls) -> set[str]:
    prefix = cls.model_config.get("env_prefix", "")
    names = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else None
        names.add((alias or f"{prefix}{name}").upper())
    return names


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split at each FROM."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def instruction(stage: list[str], keyword: str) -> list[str]:
    return [line[len(keyword):].strip() for line in stage if line.upper().startswith(keyword + " ")]


def exec_form(argument: str) -> list[str]:
    value = json.loads(argument)
    assert isinstance(value, list), f"{argument!r} should be the exec (JSON list) form"
    return value


def parse_lethe(parser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"`lethe {' '.join(argv)}` is not a command the CLI accepts")


def python_healthchecks(services: dict) -> dict[str, str]:
    """Service (or 'Dockerfile') -> the code of a ``python -c`` healthcheck."""
    found = {}
    for name, service in services.items():
        test = (service.get("healthcheck") or {}).get("test") or []
        if isinstance(test, list) and "python" in test and "-c" in test:
            found[name] = test[test.index("-c") + 1]
    (healthcheck,) = instruction(dockerfile_stages()[-1], "HEALTHCHECK")
    command = exec_form(healthcheck[healthcheck.index("CMD ") + 4:])
    found["Dockerfile"] = command[command.index("-c") + 1]
    return found


# ---- the services ----

def test_the_stack_has_the_api_workers_scheduler_stores_and_one_shot_jobs(services):
    expected = {"api", "worker", "sweeper", "migrate", "postgres", "redis", "minio", "minio-init"}
    assert expected <= set(services), f"missing: {expected - set(services)}"


def test_every_lethe_service_is_built_from_the_repository_dockerfile(services):
    for name in LETHE_SERVICES:
        build = services[name].get("build")
        assert build, f"{name} has no build"
        context = build if isinstance(build, str) else build.get("context")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (ROOT / context).resolve() == ROOT and (ROOT / context / dockerfile).resolve() == DOCKERFILE, name


def test_every_lethe_service_runs_the_same_image(services):
    images = {services[name].get("image") for name in LETHE_SERVICES}
    assert len(images) == 1 and None not in images, images


def test_lethe_services_are_given_only_known_settings_and_aws_variables(services):
    allowed = settings_variables(Settings) | settings_variables(UnlearnSettings) | AWS_VARIABLES
    for name in LETHE_SERVICES:
        unknown = set(environment(services[name])) - allowed
        assert not unknown, f"{name} sets variables no settings class reads: {sorted(unknown)}"


def test_the_settings_classes_accept_the_compose_environment(services, monkeypatch):
    for key, value in environment(services["api"]).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    UnlearnSettings()
    assert settings.database.startswith("postgresql+psycopg://") and settings.broker.startswith("redis://")


def test_the_database_and_broker_urls_point_at_services_of_the_stack(services):
    env = environment(services["api"])
    for variable, service in [("LETHE_DATABASE_URL", "postgres"), ("LETHE_BROKER_URL", "redis")]:
        assert urlsplit(env[variable]).hostname == service, variable
        assert service in services


def test_the_database_password_is_the_one_postgres_is_started_with(services):
    url = urlsplit(environment(services["api"])["LETHE_DATABASE_URL"])
    postgres = environment(services["postgres"])
    assert (url.username, url.password, url.path.lstrip("/")) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"])


def test_the_s3_credentials_are_the_object_store_s(services):
    env, minio = environment(services["api"]), environment(services["minio"])
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])
    assert urlsplit(env["AWS_ENDPOINT_URL"]).hostname == "minio"


def test_the_bucket_job_creates_every_bucket_the_settings_name(services):
    env = environment(services["api"])
    uris = [env["LETHE_ARTIFACTS_URI"], *re.split(r"[,\s]+", env.get("LETHE_DATA_ROOTS", ""))]
    buckets = {urlsplit(uri).netloc for uri in uris if uri.startswith("s3://")}
    assert buckets, "no s3:// location in LETHE_ARTIFACTS_URI or LETHE_DATA_ROOTS"
    job = " ".join(services["minio-init"]["command"])
    for bucket in buckets:
        assert re.search(rf"mb\b[^&;]*\b\w+/{re.escape(bucket)}\b", job), f"minio-init does not create {bucket}"


def test_secrets_come_from_the_environment_with_development_defaults():
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    for service, variable in [("postgres", "POSTGRES_PASSWORD"), ("minio", "MINIO_ROOT_PASSWORD")]:
        assert raw[service]["environment"][variable].startswith(f"${{{variable}:-"), (service, variable)


# ---- health and start-up order ----

def one_shot_services(services: dict) -> set[str]:
    return {dependency for service in services.values()
            for dependency, spec in (service.get("depends_on") or {}).items()
            if isinstance(spec, dict) and spec.get("condition") == "service_completed_successfully"}


def test_every_long_running_service_has_a_healthcheck(services):
    image_has_one = bool(instruction(dockerfile_stages()[-1], "HEALTHCHECK"))
    for name, service in services.items():
        if name in one_shot_services(services):
            continue
        healthcheck = service.get("healthcheck")
        inherited = name in LETHE_SERVICES and image_has_one
        assert (healthcheck and not healthcheck.get("disable")) or (healthcheck is None and inherited), name


def test_lethe_services_without_http_replace_the_images_http_healthcheck(services, parser):
    for name in LETHE_SERVICES:
        if parse_lethe(parser, services[name]["command"]).command != "serve":
            assert "healthcheck" in services[name], f"{name} would inherit the API's /healthz check"


def test_one_shot_jobs_run_once(services):
    jobs = one_shot_services(services)
    assert jobs == {"migrate", "minio-init"}
    for name in jobs:
        assert services[name].get("restart", "no") == "no", name


def test_the_long_running_lethe_services_wait_for_healthy_stores_and_finished_jobs(services):
    expected = {
        "postgres": "service_healthy", "redis": "service_healthy", "minio": "service_healthy",
        "minio-init": "service_completed_successfully", "migrate": "service_completed_successfully",
    }
    for name in LONG_RUNNING_LETHE:
        depends = services[name].get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        assert {dep: spec.get("condition") for dep, spec in depends.items()} == expected, name


def test_every_dependency_states_its_condition(services):
    for name, service in services.items():
        depends = service.get("depends_on")
        if depends is None:
            continue
        assert isinstance(depends, dict), f"{name}: a bare depends_on list waits for nothing"
        for dependency, spec in depends.items():
            assert spec.get("condition") in ("service_healthy", "service_completed_successfully"), (name, dependency)


def test_migrate_waits_for_a_healthy_database(services):
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_python_healthchecks_import_only_names_that_exist(services):
    for name, code in python_healthchecks(services).items():
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
                assert not missing, f"{name}: {node.module} has no {missing}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)


def test_the_api_healthcheck_asks_healthz_on_the_served_port(parser):
    code = python_healthchecks({})["Dockerfile"]
    (cmd,) = instruction(dockerfile_stages()[-1], "CMD")
    args = parse_lethe(parser, exec_form(cmd))
    assert args.command == "serve" and f"http://127.0.0.1:{args.port}/healthz" in code


# ---- workers and scaling ----

def test_workers_reserve_an_nvidia_gpu(services):
    for name in GPU_WORKERS:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), name


def test_the_worker_can_be_scaled(services):
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker


def test_no_service_fixes_its_container_name(services):
    assert [name for name, service in services.items() if "container_name" in service] == []


# ---- the commands ----

def test_the_api_serves_on_every_interface_of_its_container(services, parser):
    args = parse_lethe(parser, services["api"]["command"])
    assert (args.command, args.host) == ("serve", "0.0.0.0")


def test_the_scalable_worker_runs_no_scheduler(services, parser):
    args = parse_lethe(parser, services["worker"]["command"])
    assert args.command == "worker" and not args.beat


def test_exactly_one_service_runs_the_sweep_and_it_takes_no_gpu(services, parser):
    commands = {name: parse_lethe(parser, services[name]["command"]) for name in LETHE_SERVICES}
    sweepers = [name for name, args in commands.items()
                if args.command == "sweeper" or getattr(args, "beat", False)]
    assert sweepers == ["sweeper"] and commands["sweeper"].command == "sweeper"
    assert services["sweeper"].get("deploy", {}).get("replicas", 1) == 1
    assert "resources" not in services["sweeper"].get("deploy", {})


def test_migrate_runs_db_upgrade(services, parser):
    args = parse_lethe(parser, services["migrate"]["command"])
    assert (args.command, args.db_command) == ("db", "upgrade")


def test_the_image_runs_lethe_and_serves_by_default(parser):
    final = dockerfile_stages()[-1]
    (entrypoint,) = instruction(final, "ENTRYPOINT")
    (cmd,) = instruction(final, "CMD")
    assert exec_form(entrypoint) == ["lethe"]
    assert parse_lethe(parser, exec_form(cmd)).command == "serve"


# ---- the image ----

def test_the_dockerfile_builds_in_stages():
    assert len(dockerfile_stages()) >= 2


def test_the_final_stage_takes_its_virtualenv_from_the_build_stage():
    stages = dockerfile_stages()
    earlier = {line.split()[-1] for stage in stages[:-1] for line in stage[:1] if " AS " in line.upper()}
    copies = [line.split() for line in instruction(stages[-1], "COPY") if line.startswith("--from=")]
    assert any(words[0].removeprefix("--from=") in earlier and words[1] == "/opt/venv" for words in copies), copies


def test_the_final_stage_is_python_3_11_slim():
    base = dockerfile_stages()[-1][0].split()[1]
    if base.startswith("${"):  # FROM ${PYTHON_IMAGE}: the ARG's default
        arg = base.strip("${}")
        (default,) = re.findall(rf"^ARG {arg}=(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
        base = default
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-bookworm)?", base), base


def test_the_final_stage_installs_no_compiler():
    final = dockerfile_stages()[-1]
    runs = " ".join(instruction(final, "RUN"))
    assert not COMPILERS.search(runs), COMPILERS.search(runs)
    assert "pip install" not in runs  # dependencies come built from the build stage


def test_the_image_runs_as_a_non_root_user():
    users = instruction(dockerfile_stages()[-1], "USER")
    assert users, "no USER in the final stage"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_the_image_keeps_state_in_lethe_home():
    final = " ".join(dockerfile_stages()[-1])
    assert re.search(r"LETHE_HOME=/var/lib/lethe\b", final)
    assert re.search(r"install -d -o lethe -g lethe [^&]*/var/lib/lethe", final), "LETHE_HOME not owned by lethe"
    assert "home" in Settings.model_fields


def test_the_image_has_a_healthcheck():
    assert instruction(dockerfile_stages()[-1], "HEALTHCHECK")


# ---- persistence ----

@pytest.mark.parametrize("service, path", [("postgres", "/var/lib/postgresql/data"), ("minio", "/data")])
def test_stores_keep_their_data_in_named_volumes(compose, service, path):
    mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["services"][service].get("volumes", [])}
    assert path in mounts, f"{service} does not mount {path}"
    assert mounts[path] in (compose.get("volumes") or {}), f"{mounts[path]} is not a declared volume"
