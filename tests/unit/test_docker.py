"""Static checks of the container files in docker/: they must agree with the lock and the bootstrap script.

No Docker engine is needed: the files are parsed, and the runtime entry point runs against stub commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
AIRFLOW_DOCKERFILE = DOCKER / "airflow.Dockerfile"
RUNTIME_DOCKERFILE = DOCKER / "runtime.Dockerfile"
DOCKERFILES = [AIRFLOW_DOCKERFILE, RUNTIME_DOCKERFILE]
ENTRYPOINT = DOCKER / "runtime-entrypoint.sh"
POSTGRES_INIT = DOCKER / "postgres-init.sql"
BOOTSTRAP = ROOT / "scripts" / "bootstrap.sh"
LOCK = ROOT / "requirements" / "lock.txt"
LOCK_REL = LOCK.relative_to(ROOT).as_posix()

AIRFLOW_SERVICES = {
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
}
EXPECTED_SERVICES = AIRFLOW_SERVICES | {"postgres", "redis", "minio", "createbuckets", "mlflow"}
ONE_SHOT_SERVICES = {"airflow-init", "createbuckets"}
AIRFLOW_COMMANDS = {
    "airflow-init": ["airflow", "db", "migrate"],
    "airflow-apiserver": ["airflow", "api-server"],
    "airflow-scheduler": ["airflow", "scheduler"],
    "airflow-dag-processor": ["airflow", "dag-processor"],
    "airflow-triggerer": ["airflow", "triggerer"],
    "airflow-worker": ["airflow", "celery", "worker"],
}

_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def _with_defaults(value: str) -> str:
    """Compose interpolation with an empty environment: ${VAR:-default} -> default, $$ -> $."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value).replace("$$", "$")


def _command_tokens(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


# ---------------------------------------------------------------- helpers: Dockerfiles, lock, bootstrap


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and line continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name} ends inside a line continuation"
    return instructions


def _args(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in _instructions(path) if kw == keyword]


def _bootstrap_text() -> str:
    return BOOTSTRAP.read_text()


def _bootstrap_torch_version() -> str:
    match = re.search(r'^TORCH_VERSION="([^"]+)"', _bootstrap_text(), re.MULTILINE)
    assert match, "scripts/bootstrap.sh defines no TORCH_VERSION"
    return match.group(1)


def _lock_pin(name: str) -> str:
    match = re.search(rf"^{re.escape(name)}==(\S+)", LOCK.read_text(), re.MULTILINE)
    assert match, f"{name} is not pinned in {LOCK_REL}"
    return match.group(1)


def _lock_python_version() -> str:
    match = re.search(r"--python-version\s+(\d+\.\d+)", LOCK.read_text())
    assert match, f"{LOCK_REL} does not say which Python it was compiled for"
    return match.group(1)


def _constraint_files(text: str) -> list[str]:
    """Paths passed to -c/--constraint, relative to the repository root ($ROOT/ and quotes dropped)."""
    found = re.findall(r"(?:^|\s)(?:-c|--constraint)[\s=]+\"?(?:\$ROOT/|\$\{ROOT\}/)?([^\s\"]+\.txt)\b", text)
    return [path.removeprefix("./") for path in found]


# ---------------------------------------------------------------- helpers: compose


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def _depends_on(service: dict) -> dict[str, str]:
    """depends_on as {name: condition}, for both the list and the mapping forms."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _mounts(service: dict) -> dict[str, str]:
    """{container path: source} of a service's volumes, for the short (``src:dst[:mode]``) and long forms."""
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts[str(volume["target"]).rstrip("/")] = str(volume.get("source", ""))
        else:
            source, _, rest = str(volume).partition(":")
            mounts[rest.split(":")[0].rstrip("/")] = source
    return mounts


def _networks(service: dict) -> set[str]:
    networks = service.get("networks")
    if networks is None:
        return {"default"}
    return set(networks) if isinstance(networks, (list, dict)) else {str(networks)}


def _created_buckets(services: dict[str, dict]) -> set[str]:
    """Buckets the one-shot createbuckets service makes (`mc mb [--flags] ALIAS/BUCKET`)."""
    script = _with_defaults(str(services["createbuckets"]["command"]))
    return set(re.findall(r"mc mb (?:--\S+ )*\S+/([\w.-]+)", script))


def _built_dockerfile(service: dict) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = (COMPOSE.parent / build.get("context", ".")).resolve()
    return (context / build.get("dockerfile", "Dockerfile")).resolve()


# ---------------------------------------------------------------- (a) compose.yaml


def test_compose_has_the_whole_stack(compose: dict, services: dict[str, dict]) -> None:
    assert set(services) >= EXPECTED_SERVICES, f"missing: {sorted(EXPECTED_SERVICES - set(services))}"
    assert "x-airflow-common" in compose


def test_airflow_services_are_built_from_the_airflow_dockerfile(services: dict[str, dict]) -> None:
    for name in sorted(AIRFLOW_SERVICES | {"mlflow"}):
        assert _built_dockerfile(services[name]) == AIRFLOW_DOCKERFILE.resolve(), name
    # One image for all of them: built once, tagged once.
    assert len({services[name].get("image") for name in AIRFLOW_SERVICES | {"mlflow"}}) == 1


def test_airflow_services_run_airflow_3_commands(services: dict[str, dict]) -> None:
    for name, expected in AIRFLOW_COMMANDS.items():
        tokens = _command_tokens(services[name]["command"])
        if tokens[0] != "airflow":  # the image's entrypoint also takes the command without "airflow"
            tokens = ["airflow", *tokens]
        assert tokens == expected, name


def test_depends_on_names_existing_services_with_usable_conditions(services: dict[str, dict]) -> None:
    for name, service in services.items():
        for dep, condition in _depends_on(service).items():
            assert dep in services, f"{name} depends on unknown service {dep!r}"
            assert dep != name
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
            if condition == "service_completed_successfully":
                assert dep in ONE_SHOT_SERVICES, f"{name} waits for long-running {dep} to exit"


def test_long_running_services_have_healthchecks(services: dict[str, dict]) -> None:
    for name in sorted(set(services) - ONE_SHOT_SERVICES):
        test = services[name].get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"


def test_airflow_services_share_one_configuration(compose: dict, services: dict[str, dict]) -> None:
    common = _env(compose["x-airflow-common"])
    for name in sorted(AIRFLOW_SERVICES):
        env = _env(services[name])
        assert {key: env.get(key) for key in common} == common, name
    assert common["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert common["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert _with_defaults(common["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).startswith("postgresql")
    assert _with_defaults(common["AIRFLOW__CELERY__RESULT_BACKEND"]).startswith("db+postgresql")
    assert urlsplit(_with_defaults(common["AIRFLOW__CELERY__BROKER_URL"])).hostname == "redis"
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND"):
        assert urlsplit(_with_defaults(common[key]).removeprefix("db+")).hostname == "postgres", key


def test_execution_api_url_points_at_the_api_server(compose: dict, services: dict[str, dict]) -> None:
    url = urlsplit(_env(compose["x-airflow-common"])["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert url.hostname == "airflow-apiserver"
    assert url.path.rstrip("/") == "/execution"
    published = [str(port).rsplit(":", 1)[-1] for port in services["airflow-apiserver"]["ports"]]
    assert str(url.port) in published


def test_artifacts_go_to_minio_through_the_connection(compose: dict, services: dict[str, dict]) -> None:
    env = _env(compose["x-airflow-common"])
    assert env["AIRFLOW__LLMOPS__ARTIFACT_ROOT"] == "s3://llmops/artifacts"
    assert env["AIRFLOW__LLMOPS__ARTIFACT_CONN_ID"] == "minio_s3"
    conn = json.loads(_with_defaults(env["AIRFLOW_CONN_MINIO_S3"]))
    assert conn["conn_type"] == "aws"
    assert conn["login"]
    assert conn["password"]
    endpoint = urlsplit(conn["extra"]["endpoint_url"])
    assert endpoint.hostname == "minio"
    assert endpoint.port == 9000
    # The bucket of the artifact root exists: createbuckets makes it.
    assert urlsplit(env["AIRFLOW__LLMOPS__ARTIFACT_ROOT"]).hostname in _created_buckets(services)


# The local platform's components in separate containers: what the worker writes, the triggerer, scheduler and API
# server read at the same path; the triggerer reaches the worker's model servers over the compose network.
LOCAL_PLATFORM_SHARERS = ("airflow-worker", "airflow-triggerer", "airflow-scheduler", "airflow-apiserver")


def _shared_mount(services: dict[str, dict], compose: dict, path: str) -> tuple[str, str]:
    """(mount point, named volume) holding ``path`` in every local-platform service, the same in each."""
    found = set()
    for name in LOCAL_PLATFORM_SHARERS:
        mounts = _mounts(services[name])
        holding = [target for target in mounts if path == target or path.startswith(target + "/")]
        assert holding, f"{name} does not mount a volume holding {path}"
        target = max(holding, key=len)
        found.add((target, mounts[target]))
    assert len(found) == 1, f"{path} comes from different mounts: {sorted(found)}"
    target, volume = found.pop()
    assert volume in (compose.get("volumes") or {}), f"{volume} is not a named volume of the stack"
    return target, volume


def test_local_jobs_and_endpoints_are_on_a_volume_every_component_shares(
    compose: dict, services: dict[str, dict]
) -> None:
    roots = {}
    for key in ("AIRFLOW__LLMOPS__LOCAL_JOBS_ROOT", "AIRFLOW__LLMOPS__LOCAL_ENDPOINTS_ROOT"):
        values = {_env(services[name]).get(key) for name in LOCAL_PLATFORM_SHARERS}
        assert len(values) == 1, f"{key} differs between services: {values}"
        (value,) = values
        assert value and value.startswith("/"), f"{key} must be an absolute path, not {value!r}"
        roots[key] = value
    mounts = {_shared_mount(services, compose, root) for root in roots.values()}
    assert len(mounts) == 1, mounts
    assert len(set(roots.values())) == 2, "jobs and endpoints need folders of their own"


def test_the_image_creates_the_shared_mount_point_as_the_airflow_user(compose: dict, services: dict[str, dict]) -> None:
    """A new named volume takes the owner of the image's folder at its mount point: root where the image has none,
    and then the airflow user could not write its jobs and endpoints."""
    target, _ = _shared_mount(services, compose, _env(services["airflow-worker"])["AIRFLOW__LLMOPS__LOCAL_JOBS_ROOT"])
    user = "root"
    created_by = None
    for keyword, args in _instructions(AIRFLOW_DOCKERFILE):
        if keyword == "USER":
            user = args
        if keyword == "RUN" and "mkdir" in args:
            for token in shlex.split(args):
                if token.rstrip("/") == target or token.startswith(target + "/"):
                    created_by = user
    assert created_by == "airflow", f"airflow.Dockerfile must create {target} as the airflow user (got {created_by})"


def test_endpoints_bind_every_interface_and_advertise_the_worker(services: dict[str, dict]) -> None:
    for name in LOCAL_PLATFORM_SHARERS:
        env = _env(services[name])
        assert env.get("AIRFLOW__LLMOPS__LOCAL_ENDPOINTS_HOST") == "0.0.0.0", name
        # Deploy tasks run on the worker, so its servers live there; the name resolves on the compose network.
        assert env.get("AIRFLOW__LLMOPS__LOCAL_ENDPOINTS_ADVERTISE_HOST") == "airflow-worker", name
    worker, triggerer = services["airflow-worker"], services["airflow-triggerer"]
    assert _networks(worker) & _networks(triggerer), "the triggerer cannot reach the worker's model servers"
    assert worker.get("network_mode") is None and triggerer.get("network_mode") is None
    # One worker: scaled replicas would share the advertised name.
    assert (worker.get("deploy") or {}).get("replicas", 1) == 1
    assert "scale" not in worker


def test_mlflow_uses_postgres_and_minio(compose: dict, services: dict[str, dict]) -> None:
    mlflow = services["mlflow"]
    tokens = _command_tokens(mlflow.get("entrypoint", [])) + _command_tokens(mlflow["command"])
    options = dict(_with_defaults(token).split("=", 1) for token in tokens if token.startswith("--") and "=" in token)
    backend = urlsplit(options["--backend-store-uri"])
    assert backend.scheme.startswith("postgresql")
    assert backend.hostname == "postgres"
    created_databases = re.findall(r"CREATE DATABASE (\w+)", POSTGRES_INIT.read_text())
    assert backend.path.lstrip("/") in created_databases
    artifacts = urlsplit(options["--artifacts-destination"])
    assert artifacts.scheme == "s3"
    assert artifacts.hostname in _created_buckets(services)
    assert urlsplit(_env(mlflow)["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    assert urlsplit(_env(compose["x-airflow-common"])["MLFLOW_TRACKING_URI"]).hostname == "mlflow"


def test_postgres_runs_the_init_script(services: dict[str, dict]) -> None:
    volumes = [str(volume) for volume in services["postgres"]["volumes"]]
    mounts = [v for v in volumes if v.split(":")[1].startswith("/docker-entrypoint-initdb.d/")]
    assert mounts, "postgres-init.sql is not mounted into /docker-entrypoint-initdb.d/"
    assert (COMPOSE.parent / mounts[0].split(":")[0]).resolve() == POSTGRES_INIT.resolve()


def test_credentials_are_placeholders_from_the_environment(services: dict[str, dict]) -> None:
    for name, service in services.items():
        for key, value in _env(service).items():
            if re.search(r"PASSWORD|SECRET", key) and not key.endswith("_FILE"):
                assert value.startswith("${"), f"{name}: {key} is hard-coded; read it from the environment"


# ---------------------------------------------------------------- (b) Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_from_the_bootstrap_lock(dockerfile: Path) -> None:
    assert LOCK.is_file()
    assert _constraint_files(_bootstrap_text()) == [LOCK_REL], "bootstrap.sh installs with another lock"
    runs = " ".join(_args(dockerfile, "RUN"))
    assert f"-c {LOCK_REL}" in runs
    assert _constraint_files(runs) == [LOCK_REL]
    assert "uv pip install" in runs


@pytest.mark.parametrize(
    ("dockerfile", "extras"),
    [(AIRFLOW_DOCKERFILE, ".[all]"), (RUNTIME_DOCKERFILE, ".[local,mlflow,serving,storage]")],
    ids=["airflow", "runtime"],
)
def test_dockerfile_installs_the_project_with_its_extras(dockerfile: Path, extras: str) -> None:
    uv_runs = [run for run in _args(dockerfile, "RUN") if "uv pip install" in run]
    assert any(extras in shlex.split(run) for run in uv_runs)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_bootstrap_torch_first(dockerfile: Path) -> None:
    version = _bootstrap_torch_version()
    assert _lock_pin("torch") == version
    assert f"TORCH_VERSION={version}" in _args(dockerfile, "ARG")
    runs = _args(dockerfile, "RUN")
    torch_at = next(i for i, run in enumerate(runs) if 'pip install --no-cache-dir "torch==${TORCH_VERSION}"' in run)
    uv_at = next(i for i, run in enumerate(runs) if "uv pip install" in run)
    assert torch_at < uv_at, "torch must be installed (CPU build, with pip) before the uv install"
    assert "--index-url" in runs[torch_at]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_existing_paths_inside_the_build_context(dockerfile: Path) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert ignore[0] == "*", ".dockerignore should start from nothing (the context holds a multi-GB .venv)"
    for args in _args(dockerfile, "COPY"):
        tokens = [token for token in shlex.split(args) if not token.startswith("--")]
        for source in tokens[:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"
            assert f"!{source.rstrip('/')}" in ignore or f"!{source}" in ignore, f".dockerignore drops {source}"


def test_airflow_image_matches_the_lock() -> None:
    (base,) = _args(AIRFLOW_DOCKERFILE, "FROM")
    match = re.fullmatch(r"apache/airflow:(\d+)\.(\d+)\.\d+-python(\d+\.\d+)", base)
    assert match, f"unexpected base image {base}"
    lock_major, lock_minor = _lock_pin("apache-airflow").split(".")[:2]
    assert (match.group(1), match.group(2)) == (lock_major, lock_minor)
    assert match.group(3) == _lock_python_version()


def test_airflow_image_installs_as_the_airflow_user() -> None:
    user = "root"
    for keyword, args in _instructions(AIRFLOW_DOCKERFILE):
        if keyword == "USER":
            user = args
        if keyword == "RUN" and "install" in args:
            assert user == "airflow", f"installs as {user}: {args[:60]}"
    assert user == "airflow"
    assert any(dest.split()[-1].rstrip("/") == "/opt/airflow/dags" for dest in _args(AIRFLOW_DOCKERFILE, "COPY"))


def test_runtime_image_matches_the_lock_and_uses_the_entrypoint_under_tini() -> None:
    (base,) = _args(RUNTIME_DOCKERFILE, "FROM")
    assert base == f"python:{_lock_python_version()}-slim"
    assert any(arg.startswith("TORCH_INDEX=") for arg in _args(RUNTIME_DOCKERFILE, "ARG"))
    (entrypoint,) = _args(RUNTIME_DOCKERFILE, "ENTRYPOINT")
    # tini is PID 1: it forwards SIGTERM (a stopped job, a reclaimed spot instance) and reaps torchrun's workers.
    init, separator, target = json.loads(entrypoint)
    assert (init, separator) == ("/usr/bin/tini", "--")
    installs = [shlex.split(run) for run in _args(RUNTIME_DOCKERFILE, "RUN") if "apt-get install" in run]
    assert any("tini" in tokens for tokens in installs), "tini (the Debian package, /usr/bin/tini) is not installed"
    copies = [shlex.split(args) for args in _args(RUNTIME_DOCKERFILE, "COPY")]
    assert any(tokens[-2:] == ["docker/runtime-entrypoint.sh", target] for tokens in copies)
    # SageMaker starts a serving container with `serve`, Vertex AI with no arguments: both serve.
    (cmd,) = _args(RUNTIME_DOCKERFILE, "CMD")
    assert json.loads(cmd) == ["serve"]


def test_runtime_image_holds_the_object_store_filesystems_from_the_lock() -> None:
    match = re.search(r"^storage = \[([^\]]*)\]", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, "pyproject.toml has no `storage` extra"
    storage = sorted(json.loads(f"[{match.group(1)}]"))
    assert storage == ["adlfs", "gcsfs", "s3fs"]
    for name in storage:
        assert _lock_pin(name)  # installed with -c lock.txt: the lock must pin each one
    runs = " ".join(_args(RUNTIME_DOCKERFILE, "RUN"))
    assert "import airflow_llmops, torch, s3fs, gcsfs, adlfs" in runs, "the build does not check the imports"


# ---------------------------------------------------------------- (c) runtime-entrypoint.sh


def test_entrypoint_is_executable_and_valid_bash() -> None:
    assert os.access(ENTRYPOINT, os.X_OK)
    staged = subprocess.run(
        ["git", "ls-files", "--stage", "--", ENTRYPOINT.relative_to(ROOT).as_posix()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if staged:  # tracked: the mode git records is what a fresh checkout gets
        assert staged[0] == "100755"
    bash = shutil.which("bash")
    assert bash
    subprocess.run([bash, "-n", str(ENTRYPOINT)], check=True)


@pytest.fixture
def stub_path(tmp_path: Path) -> str:
    """A PATH whose python and airflow-llmops print how they were called."""
    for name in ("python", "airflow-llmops"):
        stub = tmp_path / name
        stub.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        stub.chmod(0o755)
    return f"{tmp_path}{os.pathsep}{os.environ['PATH']}"


def _dispatch(stub_path: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in {"AIP_HTTP_PORT", "LLMOPS_SERVE_PORT"}}
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args],
        env={**environ, "PATH": stub_path, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_entrypoint_hands_train_to_the_runtime(stub_path: str) -> None:
    result = _dispatch(stub_path, "train")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["python", "-m", "airflow_llmops.ml.runtime", "train"]


def test_entrypoint_hands_serve_to_the_runtime_and_serves_by_default(stub_path: str) -> None:
    serve = _dispatch(stub_path, "serve", "--model", "m")
    assert serve.returncode == 0, serve.stderr
    assert serve.stdout.split() == ["python", "-m", "airflow_llmops.ml.runtime", "serve", "--model", "m"]
    # The host and port come from the runtime (AIP_HTTP_PORT > SAGEMAKER_BIND_TO_PORT > LLMOPS_SERVE_PORT > 8080).
    bare = _dispatch(stub_path)
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout.split() == ["python", "-m", "airflow_llmops.ml.runtime", "serve"]


def test_entrypoint_runs_other_commands(stub_path: str) -> None:
    assert _dispatch(stub_path, "echo", "hello").stdout.strip() == "hello"
    assert "usage" in _dispatch(stub_path, "--help").stdout
    assert _dispatch(stub_path, "false").returncode != 0
