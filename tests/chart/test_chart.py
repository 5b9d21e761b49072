"""The Helm chart, rendered by Helm's own engine (helm-python-sdk) and checked offline.

Every values set (defaults, each example file, a set of toggles) must lint cleanly, render, and give
manifests that validate against the Kubernetes schemas (`kubernetes-validate --strict`). CRDs (KEDA,
Prometheus Operator) have no bundled schema, so the tests assert on their shape directly. The rest pins
what the chart promises: GPUs follow the tensor parallel size, probes use the processes' gRPC health
services, grace periods cover the drain graces, no secret is inlined, exactly one Redis, and the schema
refuses bad values.

No skips: these tests need helm-python-sdk and kubernetes-validate, and fail loudly without them.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from mistral_serve.common import keys
from mistral_serve.common.quota import Quota
from mistral_serve.common.telemetry import OTLP_PROTOCOLS
from mistral_serve.frontend.settings import FrontendSettings
from mistral_serve.worker.settings import WorkerSettings

CHART_DIR = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "mistral-serve"
EXAMPLES = sorted((CHART_DIR / "examples").glob("*-values.yaml"))
RELEASE = "ms"
NAMESPACE = "serving"
FULLNAME = f"{RELEASE}-mistral-serve"
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) with every field it uses.
KUBE_VERSION = "1.30.0"
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
GPU = "nvidia.com/gpu"
FRONTEND_READINESS = "mistral_serve.v1.ChatService"
# The frontend's HTTP health paths (the HTTP door serves them on MISTRAL_SERVE_HTTP_PORT).
HTTP_LIVENESS, HTTP_READINESS = "/health/live", "/health/ready"
REDIS_AUTH_SECRET = f"{FULLNAME}-redis-auth"
WORKER_READINESS = "mistral_serve.worker"

Manifest = dict[str, Any]
Values = dict[str, Any]

EXTERNAL_REDIS: Values = {
    "redis": {
        "internal": {"enabled": False},
        "external": {
            "url": "rediss://redis.data.svc:6380/1",
            "passwordSecret": {"name": "redis-auth", "key": "password"},
            "tlsCASecret": {"name": "redis-ca", "key": "ca.crt"},
        },
    }
}

# Toggles beyond the example files: each turns on what the defaults leave off.
TOGGLES: dict[str, Values] = {
    "external-redis": EXTERNAL_REDIS,
    "external-redis-plain": {
        "redis": {"internal": {"enabled": False}, "external": {"url": "redis://redis.data.svc"}}
    },
    "keda-internal-redis": {"keda": {"enabled": True}},
    "keda-lag-scale-to-zero": {"keda": {"enabled": True, "trigger": "lagCount", "minReplicaCount": 0}},
    "keda-pending-scale-to-zero": {"keda": {"enabled": True, "minReplicaCount": 0}},
    "keda-external-redis": {**EXTERNAL_REDIS, "keda": {"enabled": True, "trigger": "streamLength"}},
    "observability": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "otel": {"endpoint": "http://otel.obs:4317", "resourceAttributes": {"env": "test"}},
    },
    "network-policies": {
        "networkPolicy": {"enabled": True, "allowedNamespaces": ["apps"]},
        "keda": {"enabled": True},
    },
    "network-policies-no-metrics": {"networkPolicy": {"enabled": True, "metricsNamespaces": []}},
    "frontend-mtls": {
        "frontend": {
            "tls": {"enabled": True, "existingSecret": "fe-tls", "clientCA": {"existingSecret": "fe-ca"}}
        }
    },
    "auth-off": {"frontend": {"auth": {"enabled": False}}},
    "quotas": {
        "frontend": {"quotas": {"default": "rps=5 tpm=200000 inflight=8"}, "callerHeader": "x-caller"}
    },
    "http-probes": {"frontend": {"probes": {"protocol": "http"}, "httpPort": 8080}},
    "redis-own-secret-and-claim": {
        "redis": {
            "internal": {
                "auth": {"existingSecret": "redis-pass", "key": "pw"},
                "persistence": {"existingClaim": "redis-data", "appendfsync": "always"},
            }
        },
        "keda": {"enabled": True},
    },
    "redis-ephemeral-open": {
        "redis": {"internal": {"persistence": {"enabled": False}, "networkPolicy": {"enabled": False}}}
    },
    "fixed-replicas": {
        "frontend": {"autoscaling": {"enabled": False}, "replicas": 3, "pdb": {"enabled": False}},
        "worker": {"replicas": 2, "pdb": {"enabled": False}},
    },
    "host-path-cache": {
        "worker": {"modelCache": {"type": "hostPath", "offline": True}, "hfToken": {"existingSecret": "hf"}}
    },
    "existing-claim": {"worker": {"modelCache": {"pvc": {"existingClaim": "weights"}}}},
    "tensor-parallel-4": {"worker": {"engine": {"tensorParallelSize": 4}}},
    "headless-frontend": {"frontend": {"service": {"headless": True}}},
    "external-service-account": {"serviceAccount": {"create": False, "name": "serving"}},
    "extras": {
        "imagePullSecrets": ["regcred"],
        "frontend": {
            "extraEnv": [{"name": "EXTRA", "value": "1"}],
            "extraVolumes": [{"name": "tok", "configMap": {"name": "tok"}}],
            "extraVolumeMounts": [{"name": "tok", "mountPath": "/tok"}],
            "tokenizerPath": "/tok/tekken.json",
            "podAnnotations": {"a": "b"},
            "priorityClassName": "high",
        },
        "worker": {"runtimeClassName": "nvidia", "nodeSelector": {"nvidia.com/gpu.present": "true"}},
    },
}

CASES: dict[str, Values] = {
    "defaults": {},
    **{f"example-{path.stem}": yaml.safe_load(path.read_text()) for path in EXAMPLES},
    **TOGGLES,
}


def merged(*overlays: Values) -> Values:
    """Deep-merge overlays left to right (lists and scalars replace)."""
    out: Values = {}
    for overlay in overlays:
        for key, value in overlay.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: helm.Chart, values: Values) -> list[Manifest]:
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[Manifest] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def one(objects: list[Manifest], kind: str, name: str) -> Manifest:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def kinds(objects: list[Manifest]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objects}


def container(deployment: Manifest) -> Manifest:
    containers: list[Manifest] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(deployment: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container(deployment).get("env", [])}


def env_value(deployment: Manifest, name: str) -> str:
    value: str = env_of(deployment)[name]["value"]
    return value


def frontend(objects: list[Manifest]) -> Manifest:
    return one(objects, "Deployment", f"{FULLNAME}-frontend")


def worker(objects: list[Manifest]) -> Manifest:
    return one(objects, "Deployment", f"{FULLNAME}-worker")


def volumes_of(deployment: Manifest) -> dict[str, Manifest]:
    return {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}


def mounts_of(deployment: Manifest) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container(deployment).get("volumeMounts", [])}


# --- lint, render, validate -------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_chart_lints_without_warnings(case: str) -> None:
    report = helm.lint(
        CHART_DIR, CASES[case], strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    # Severity 1 is info ("icon is recommended"); warnings and errors fail.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [] and report["errors"] == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_manifest_validates_against_kubernetes_schemas(chart: helm.Chart, case: str) -> None:
    objects = render(chart, CASES[case])
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        # Raises on an unknown kind too, so nothing passes unchecked.
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        assert obj["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("case", sorted(CASES))
def test_container_env_names_are_unique(chart: helm.Chart, case: str) -> None:
    for obj in render(chart, CASES[case]):
        if obj["kind"] == "Deployment":
            names = [e["name"] for e in container(obj).get("env", [])]
            assert len(names) == len(set(names)), obj["metadata"]["name"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_selectors_match_their_pods(chart: helm.Chart, case: str) -> None:
    objects = render(chart, CASES[case])
    pod_labels = {
        o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
        for o in objects
        if o["kind"] == "Deployment"
    }

    def matches(selector: dict[str, str]) -> list[str]:
        return [name for name, labels in pod_labels.items() if selector.items() <= labels.items()]

    for obj in objects:
        if obj["kind"] == "Deployment":
            assert matches(obj["spec"]["selector"]["matchLabels"]) == [obj["metadata"]["name"]]
        elif obj["kind"] == "Service":
            assert matches(obj["spec"]["selector"]) == [obj["metadata"]["name"]]
        elif obj["kind"] in {"PodDisruptionBudget", "NetworkPolicy"}:
            key = "selector" if obj["kind"] == "PodDisruptionBudget" else "podSelector"
            assert len(matches(obj["spec"][key]["matchLabels"])) == 1


def test_notes_render_for_every_case(chart: helm.Chart) -> None:
    for case, values in CASES.items():
        notes = chart.render(values, name=RELEASE, namespace=NAMESPACE)["mistral-serve/templates/NOTES.txt"]
        assert f"{FULLNAME}-frontend" in notes, case


# --- GPUs and tensor parallel -----------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_worker_gpu_count_equals_tensor_parallel(chart: helm.Chart, tp: int) -> None:
    deployment = worker(render(chart, {"worker": {"engine": {"tensorParallelSize": tp}}}))
    resources = container(deployment)["resources"]
    assert resources["limits"][GPU] == tp
    assert resources["requests"][GPU] == tp
    assert env_value(deployment, "MISTRAL_SERVE_TENSOR_PARALLEL") == str(tp)


def test_worker_defaults_to_two_gpus_and_tensor_parallel_two(chart: helm.Chart) -> None:
    deployment = worker(render(chart, {}))
    assert container(deployment)["resources"]["limits"][GPU] == 2
    assert env_value(deployment, "MISTRAL_SERVE_TENSOR_PARALLEL") == "2"


def test_gpu_count_that_contradicts_tensor_parallel_is_refused(chart: helm.Chart) -> None:
    values = {"worker": {"resources": {"limits": {GPU: 1, "memory": "96Gi"}}}}
    with pytest.raises(helm.HelmRenderError, match="tensorParallelSize"):
        render(chart, values)


def test_gpu_count_that_agrees_with_tensor_parallel_is_accepted(chart: helm.Chart) -> None:
    values = {"worker": {"resources": {"limits": {GPU: 2, "memory": "96Gi"}}}}
    assert container(worker(render(chart, values)))["resources"]["limits"][GPU] == 2


# --- probes and drain ---------------------------------------------------------------------------


def test_frontend_probes_use_grpc_health_on_the_grpc_port(chart: helm.Chart) -> None:
    deployment = frontend(render(chart, {}))
    c = container(deployment)
    port = int(env_value(deployment, "MISTRAL_SERVE_GRPC_PORT"))
    assert c["livenessProbe"]["grpc"] == {"port": port, "service": ""}
    assert c["readinessProbe"]["grpc"] == {"port": port, "service": FRONTEND_READINESS}


def test_frontend_serves_the_http_api_on_its_port(chart: helm.Chart) -> None:
    for values, port in (({}, 8000), (TOGGLES["http-probes"], 8080)):
        objects = render(chart, values)
        deployment = frontend(objects)
        assert env_value(deployment, "MISTRAL_SERVE_HTTP_PORT") == str(port)
        assert {"name": "http", "containerPort": port, "protocol": "TCP"} in container(deployment)["ports"]
        service = one(objects, "Service", f"{FULLNAME}-frontend")
        assert {"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"} in service["spec"][
            "ports"
        ]


def test_frontend_http_probes_ask_the_http_health_paths(chart: helm.Chart) -> None:
    c = container(frontend(render(chart, TOGGLES["http-probes"])))
    assert c["livenessProbe"]["httpGet"] == {"path": HTTP_LIVENESS, "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": HTTP_READINESS, "port": "http"}
    assert "grpc" not in c["livenessProbe"] and "grpc" not in c["readinessProbe"]
    assert c["readinessProbe"]["periodSeconds"] == 5
    tls = merged(TOGGLES["http-probes"], {"frontend": {"tls": {"enabled": True, "existingSecret": "fe-tls"}}})
    c = container(frontend(render(chart, tls)))
    assert c["livenessProbe"]["httpGet"] == {"path": HTTP_LIVENESS, "port": "http", "scheme": "HTTPS"}
    assert c["readinessProbe"]["httpGet"] == {"path": HTTP_READINESS, "port": "http", "scheme": "HTTPS"}


def test_frontend_with_tls_probes_the_plaintext_health_port(chart: helm.Chart) -> None:
    deployment = frontend(render(chart, TOGGLES["frontend-mtls"]))
    c = container(deployment)
    health_port = int(env_value(deployment, "MISTRAL_SERVE_HEALTH_PORT"))
    assert health_port != int(env_value(deployment, "MISTRAL_SERVE_GRPC_PORT"))
    assert c["livenessProbe"]["grpc"]["port"] == health_port
    assert c["readinessProbe"]["grpc"] == {"port": health_port, "service": FRONTEND_READINESS}


def test_worker_probes_wait_for_the_engine(chart: helm.Chart) -> None:
    deployment = worker(render(chart, {}))
    c = container(deployment)
    port = int(env_value(deployment, "MISTRAL_SERVE_HEALTH_PORT"))
    assert c["startupProbe"]["grpc"] == {"port": port, "service": WORKER_READINESS}
    assert c["readinessProbe"]["grpc"] == {"port": port, "service": WORKER_READINESS}
    assert c["livenessProbe"]["grpc"] == {"port": port, "service": ""}
    startup = c["startupProbe"]
    # Downloading and loading 24B parameters on two GPUs: at least 20 minutes before liveness counts.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60


@pytest.mark.parametrize("drain", [0, 30, 95, 600])
def test_frontend_grace_covers_prestop_and_drain(chart: helm.Chart, drain: int) -> None:
    deployment = frontend(render(chart, {"frontend": {"drainGraceSeconds": drain}}))
    spec = deployment["spec"]["template"]["spec"]
    sleep = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert env_value(deployment, "MISTRAL_SERVE_DRAIN_GRACE_S") == str(drain)
    assert spec["terminationGracePeriodSeconds"] >= int(sleep[1]) + drain


@pytest.mark.parametrize("drain", [0, 120, 900])
def test_worker_grace_covers_drain(chart: helm.Chart, drain: int) -> None:
    deployment = worker(render(chart, {"worker": {"drainGraceSeconds": drain}}))
    assert env_value(deployment, "MISTRAL_SERVE_DRAIN_GRACE_S") == str(drain)
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain


def test_drain_grace_defaults_match_the_processes(chart: helm.Chart) -> None:
    objects = render(chart, {})
    assert env_value(frontend(objects), "MISTRAL_SERVE_DRAIN_GRACE_S") == "30"
    assert env_value(worker(objects), "MISTRAL_SERVE_DRAIN_GRACE_S") == "120"


@pytest.mark.parametrize("case", sorted(CASES))
def test_recreate_strategies_carry_no_rolling_update(chart: helm.Chart, case: str) -> None:
    # The API server refuses rollingUpdate with Recreate; the offline schemas do not.
    for obj in render(chart, CASES[case]):
        if obj["kind"] == "Deployment" and obj["spec"]["strategy"]["type"] == "Recreate":
            assert "rollingUpdate" not in obj["spec"]["strategy"], obj["metadata"]["name"]


def test_trial_example_recreates_workers_on_a_single_node(chart: helm.Chart) -> None:
    trial = yaml.safe_load((CHART_DIR / "examples" / "trial-values.yaml").read_text())
    assert worker(render(chart, trial))["spec"]["strategy"] == {"type": "Recreate"}


# --- worker pod ---------------------------------------------------------------------------------


def test_worker_has_memory_backed_shm_and_a_model_cache(chart: helm.Chart) -> None:
    deployment = worker(render(chart, {}))
    volumes, mounts = volumes_of(deployment), mounts_of(deployment)
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    cache_path = next(path for path, name in mounts.items() if name == "model-cache")
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-model-cache"
    assert env_value(deployment, "HF_HOME").startswith(cache_path + "/")
    assert "HF_TOKEN" not in env_of(deployment)


def test_worker_host_path_cache_and_token_secret(chart: helm.Chart) -> None:
    objects = render(chart, TOGGLES["host-path-cache"])
    deployment = worker(objects)
    assert "hostPath" in volumes_of(deployment)["model-cache"]
    assert not [o for o in objects if o["metadata"]["name"] == f"{FULLNAME}-model-cache"]
    assert env_of(deployment)["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert env_value(deployment, "HF_HUB_OFFLINE") == "1"


def test_worker_settings_reach_the_engine(chart: helm.Chart) -> None:
    deployment = worker(render(chart, {}))
    assert env_value(deployment, "MISTRAL_SERVE_MODEL") == "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
    assert env_value(deployment, "MISTRAL_SERVE_MAX_MODEL_LEN") == "131072"
    assert env_value(deployment, "MISTRAL_SERVE_GPU_MEMORY_UTILIZATION") == "0.9"
    assert env_value(deployment, "MISTRAL_SERVE_MAX_IMAGES_PER_PROMPT") == "10"
    assert env_value(deployment, "MISTRAL_SERVE_WORKER_MAX_INFLIGHT") == "64"
    assert env_value(deployment, "MISTRAL_SERVE_METRICS_PORT") == "9091"


def test_worker_tolerates_gpu_taints(chart: helm.Chart) -> None:
    spec = worker(render(chart, {}))["spec"]["template"]["spec"]
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_pods_run_as_non_root_with_a_read_only_root(chart: helm.Chart) -> None:
    for deployment in (o for o in render(chart, {}) if o["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        sc = container(deployment)["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False


def test_frontend_tells_get_model_info_what_workers_serve(chart: helm.Chart) -> None:
    values = {"worker": {"engine": {"maxModelLen": 32768, "maxImagesPerPrompt": 4}}}
    objects = render(chart, values)
    for name in ("MISTRAL_SERVE_MODEL", "MISTRAL_SERVE_MAX_MODEL_LEN", "MISTRAL_SERVE_MAX_IMAGES_PER_PROMPT"):
        assert env_value(frontend(objects), name) == env_value(worker(objects), name)


def test_each_front_door_limit_reaches_the_frontend_setting_it_names(
    chart: helm.Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    names = sorted(schema["properties"]["frontend"]["properties"]["limits"]["properties"])
    assert names, "the chart exposes no front-door limit"
    values = {name: 1000 + i for i, name in enumerate(names)}
    env = env_of(frontend(render(chart, {"frontend": {"limits": values}})))
    for name, value in values.items():
        field = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
        variable = f"MISTRAL_SERVE_{field.upper()}"
        assert env[variable]["value"] == str(value)
        monkeypatch.setenv(variable, str(value))
    settings = FrontendSettings.from_env()
    for name, value in values.items():
        assert getattr(settings, re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()) == value


@pytest.mark.parametrize("on", [True, False])
def test_the_default_system_prompt_value_reaches_the_frontend_setting(
    chart: helm.Chart, on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = env_of(frontend(render(chart, {"frontend": {"defaultSystemPrompt": on}})))
    monkeypatch.setenv(
        "MISTRAL_SERVE_DEFAULT_SYSTEM_PROMPT", env["MISTRAL_SERVE_DEFAULT_SYSTEM_PROMPT"]["value"]
    )
    assert FrontendSettings.from_env().default_system_prompt is on


def test_the_default_system_prompt_is_on_by_default_and_must_be_a_boolean(chart: helm.Chart) -> None:
    env = env_of(frontend(render(chart, {})))
    assert env["MISTRAL_SERVE_DEFAULT_SYSTEM_PROMPT"]["value"] == "true"
    assert FrontendSettings().default_system_prompt is True
    with pytest.raises(Exception, match="defaultSystemPrompt"):
        render(chart, {"frontend": {"defaultSystemPrompt": "no"}})


def test_an_unknown_front_door_limit_is_refused(chart: helm.Chart) -> None:
    with pytest.raises(Exception, match=r"maxBananas|additional"):
        render(chart, {"frontend": {"limits": {"maxBananas": 3}}})


# --- secrets, auth, TLS --------------------------------------------------------------------------

SECRET_ENV = re.compile(r"PASSWORD|_TOKEN$|SECRET|_KEY$")


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_secret_value_is_inlined(chart: helm.Chart, case: str) -> None:
    objects = render(chart, CASES[case])
    # The one Secret the chart writes is the in-chart Redis's generated password, never a value.
    secrets = [o for o in objects if o["kind"] in {"Secret", "ConfigMap"}]
    assert [(o["kind"], o["metadata"]["name"]) for o in secrets] in ([], [("Secret", REDIS_AUTH_SECRET)])
    for obj in (frontend(objects), worker(objects)):
        for name, entry in env_of(obj).items():
            if SECRET_ENV.search(name):
                assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], name
        assert urlsplit(env_value(obj, "MISTRAL_SERVE_REDIS_URL")).password is None


def test_redis_url_with_a_password_is_refused(chart: helm.Chart) -> None:
    values = merged(EXTERNAL_REDIS, {"redis": {"external": {"url": "redis://user:hunter2@redis:6379/0"}}})
    with pytest.raises(helm.HelmValuesError):
        render(chart, values)


def test_api_keys_are_required_by_default_and_come_from_a_secret(chart: helm.Chart) -> None:
    deployment = frontend(render(chart, {}))
    keys_file = env_value(deployment, "MISTRAL_SERVE_API_KEYS_FILE")
    mounts = mounts_of(deployment)
    volume = volumes_of(deployment)[mounts[str(Path(keys_file).parent)]]
    assert volume["secret"]["secretName"] == f"{FULLNAME}-api-keys"
    assert volume["secret"]["items"] == [{"key": "api-keys", "path": Path(keys_file).name}]


def test_auth_off_drops_the_keys_file(chart: helm.Chart) -> None:
    deployment = frontend(render(chart, TOGGLES["auth-off"]))
    assert "MISTRAL_SERVE_API_KEYS_FILE" not in env_of(deployment)
    assert "api-keys" not in volumes_of(deployment)


def test_the_default_quota_and_caller_header_reach_the_frontend_as_it_reads_them(
    chart: helm.Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = frontend(render(chart, TOGGLES["quotas"]))
    for name in ("MISTRAL_SERVE_DEFAULT_QUOTA", "MISTRAL_SERVE_CALLER_HEADER"):
        monkeypatch.setenv(name, env_value(deployment, name))
    settings = FrontendSettings.from_env()
    assert settings.default_quota == Quota(requests_per_s=5.0, tokens_per_min=200000, max_inflight=8)
    assert settings.caller_header == "x-caller"
    defaults = env_of(frontend(render(chart, {})))
    assert "MISTRAL_SERVE_DEFAULT_QUOTA" not in defaults and "MISTRAL_SERVE_CALLER_HEADER" not in defaults
    for bad in ({"quotas": {"default": "rpm=5"}}, {"callerHeader": "X Caller"}):
        with pytest.raises(helm.HelmValuesError):
            render(chart, {"frontend": bad})


def test_mtls_files_come_from_secrets(chart: helm.Chart) -> None:
    deployment = frontend(render(chart, TOGGLES["frontend-mtls"]))
    env, mounts, volumes = env_of(deployment), mounts_of(deployment), volumes_of(deployment)
    expected = {
        "MISTRAL_SERVE_TLS_CERT_FILE": "fe-tls",
        "MISTRAL_SERVE_TLS_KEY_FILE": "fe-tls",
        "MISTRAL_SERVE_TLS_CLIENT_CA_FILE": "fe-ca",
    }
    for name, secret in expected.items():
        path = Path(env[name]["value"])
        volume = volumes[mounts[str(path.parent)]]
        assert volume["secret"]["secretName"] == secret
        assert path.name in {item["path"] for item in volume["secret"]["items"]}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"frontend": {"tls": {"enabled": True}}}, "existingSecret"),
        ({"frontend": {"tls": {"clientCA": {"existingSecret": "ca"}}}}, "mTLS"),
        ({"frontend": {"service": {"headless": True, "type": "LoadBalancer"}}}, "headless"),
        ({"frontend": {"metricsPort": 50051}}, "must differ"),
        ({"frontend": {"httpPort": 50051}}, "must differ"),
        ({"frontend": {"httpPort": 9090}}, "must differ"),
        (merged(TOGGLES["frontend-mtls"], {"frontend": {"healthPort": 8000}}), "must differ"),
        (merged(TOGGLES["frontend-mtls"], TOGGLES["http-probes"]), "mTLS"),
        ({"frontend": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}, "minReplicas"),
        ({"frontend": {"resources": {"requests": {"cpu": None}}}}, "requests.cpu"),
    ],
)
def test_inconsistent_frontend_values_are_refused(chart: helm.Chart, values: Values, message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, values)


# --- Redis ---------------------------------------------------------------------------------------


def test_in_chart_redis_is_the_default(chart: helm.Chart) -> None:
    objects = render(chart, {})
    one(objects, "Deployment", f"{FULLNAME}-redis")
    one(objects, "Service", f"{FULLNAME}-redis")
    for deployment in (frontend(objects), worker(objects)):
        assert env_value(deployment, "MISTRAL_SERVE_REDIS_URL") == f"redis://{FULLNAME}-redis:6379/0"


def redis_args(objects: list[Manifest]) -> dict[str, str]:
    args: list[str] = container(one(objects, "Deployment", f"{FULLNAME}-redis"))["args"]
    assert len(args) % 2 == 0 and all(a.startswith("--") for a in args[::2])
    return dict(zip(args[::2], args[1::2], strict=True))


def test_in_chart_redis_keeps_an_everysec_aof_on_a_claim_by_default(chart: helm.Chart) -> None:
    objects = render(chart, {})
    args = redis_args(objects)
    assert args["--appendonly"] == "yes"
    assert args["--appendfsync"] == "everysec"
    deployment = one(objects, "Deployment", f"{FULLNAME}-redis")
    data_dir = args["--dir"]
    claim = volumes_of(deployment)[mounts_of(deployment)[data_dir]]["persistentVolumeClaim"]["claimName"]
    pvc = one(objects, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "8Gi"


def test_in_chart_redis_persistence_settings(chart: helm.Chart) -> None:
    own = render(chart, TOGGLES["redis-own-secret-and-claim"])
    deployment = one(own, "Deployment", f"{FULLNAME}-redis")
    assert volumes_of(deployment)["data"]["persistentVolumeClaim"] == {"claimName": "redis-data"}
    assert redis_args(own)["--appendfsync"] == "always"
    assert not [o for o in own if o["kind"] == "PersistentVolumeClaim" and "redis" in o["metadata"]["name"]]
    ephemeral = render(chart, TOGGLES["redis-ephemeral-open"])
    assert volumes_of(one(ephemeral, "Deployment", f"{FULLNAME}-redis"))["data"] == {
        "name": "data",
        "emptyDir": {},
    }
    assert redis_args(ephemeral)["--appendonly"] == "yes"


def password_refs(objects: list[Manifest]) -> dict[str, Manifest]:
    """Where each Deployment's Redis password comes from (its secretKeyRef), by Deployment name."""
    refs = {
        d["metadata"]["name"]: env_of(d)["MISTRAL_SERVE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        for d in (frontend(objects), worker(objects))
    }
    redis = env_of(one(objects, "Deployment", f"{FULLNAME}-redis"))
    refs[f"{FULLNAME}-redis"] = redis["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert redis["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == refs[f"{FULLNAME}-redis"]
    return refs


def test_in_chart_redis_always_has_a_generated_password(chart: helm.Chart) -> None:
    objects = render(chart, {})
    assert redis_args(objects)["--requirepass"] == "$(REDIS_PASSWORD)"
    refs = password_refs(objects)
    assert all(ref == {"name": REDIS_AUTH_SECRET, "key": "password"} for ref in refs.values()), refs
    secret = one(objects, "Secret", REDIS_AUTH_SECRET)
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password)
    # Drawn at random on install: two fresh installs never share a password.
    again = one(render(chart, {}), "Secret", REDIS_AUTH_SECRET)
    assert again["data"]["password"] != secret["data"]["password"]


def test_in_chart_redis_password_from_the_users_secret(chart: helm.Chart) -> None:
    objects = render(chart, TOGGLES["redis-own-secret-and-claim"])
    assert not [o for o in objects if o["kind"] == "Secret"]
    refs = password_refs(objects)
    assert all(ref == {"name": "redis-pass", "key": "pw"} for ref in refs.values()), refs
    auth = one(objects, "TriggerAuthentication", f"{FULLNAME}-worker")
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "redis-pass", "key": "pw"}]


# What secret-redis.yaml asks the cluster, and what the cluster answers on an upgrade.
REDIS_SECRET_LOOKUP = 'lookup "v1" "Secret" .Release.Namespace (include "mistral-serve.redisAuthSecret" .)'
STORED_SECRET = '(dict "data" (dict "password" "a2VwdC1hY3Jvc3MtdXBncmFkZXM="))'


def test_generated_redis_password_is_kept_across_upgrades(tmp_path: Path) -> None:
    # Helm's offline render answers every `lookup` with nothing, and helm-python-sdk has no lookup stub.
    # So this copy of the chart answers secret-redis.yaml's lookup with a stored Secret, as the cluster
    # does on an upgrade; the rest of the template runs as shipped, and the stored password must stay.
    copy_dir = tmp_path / "mistral-serve"
    shutil.copytree(CHART_DIR, copy_dir)
    template = copy_dir / "templates" / "secret-redis.yaml"
    text = template.read_text()
    assert text.count(REDIS_SECRET_LOOKUP) == 1
    template.write_text(text.replace(REDIS_SECRET_LOOKUP, STORED_SECRET))
    with helm.Chart.load(copy_dir) as upgraded:
        for _ in range(2):
            rendered = upgraded.render({}, name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
            secret = one(
                [d for d in yaml.safe_load_all(rendered["mistral-serve/templates/secret-redis.yaml"]) if d],
                "Secret",
                REDIS_AUTH_SECRET,
            )
            assert base64.b64decode(secret["data"]["password"]) == b"kept-across-upgrades"


def test_in_chart_redis_never_evicts_queue_entries(chart: helm.Chart) -> None:
    args = container(one(render(chart, {}), "Deployment", f"{FULLNAME}-redis"))["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"


def test_external_redis_replaces_the_in_chart_one(chart: helm.Chart) -> None:
    objects = render(chart, EXTERNAL_REDIS)
    assert not [name for _, name in kinds(objects) if name.endswith("-redis")]
    for deployment in (frontend(objects), worker(objects)):
        env = env_of(deployment)
        assert env["MISTRAL_SERVE_REDIS_URL"]["value"] == "rediss://redis.data.svc:6380/1"
        ca_path = Path(env["MISTRAL_SERVE_REDIS_TLS_CA_FILE"]["value"])
        assert volumes_of(deployment)[mounts_of(deployment)[str(ca_path.parent)]]["secret"] == {
            "secretName": "redis-ca",
            "items": [{"key": "ca.crt", "path": ca_path.name}],
        }
        assert env["MISTRAL_SERVE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "redis-auth",
            "key": "password",
        }


@pytest.mark.parametrize(
    "values",
    [
        {"redis": {"internal": {"enabled": True}, "external": {"url": "redis://redis:6379/0"}}},
        {"redis": {"internal": {"enabled": False}}},
    ],
    ids=["both", "neither"],
)
def test_exactly_one_redis_is_required(chart: helm.Chart, values: Values) -> None:
    with pytest.raises(helm.HelmRenderError, match="redis"):
        render(chart, values)


@pytest.mark.parametrize("pool", ["default", "vision"])
def test_keda_watches_every_band_stream_that_the_code_uses(chart: helm.Chart, pool: str) -> None:
    objects = render(chart, {"pool": pool, "keda": {"enabled": True}})
    assert env_value(frontend(objects), "MISTRAL_SERVE_POOL") == pool
    assert env_value(worker(objects), "MISTRAL_SERVE_POOL") == pool
    triggers = one(objects, "ScaledObject", f"{FULLNAME}-worker")["spec"]["triggers"]
    streams = [t for t in triggers if t["type"] == "redis-streams"]
    waiting = [t for t in triggers if t["type"] == "redis"]
    assert len(triggers) == len(streams) + len(waiting)
    # The names come from keys.py, the code's one home for them, so chart and code cannot drift.
    assert [t["metadata"]["stream"] for t in streams] == keys.request_streams(pool)
    assert [t["name"] for t in streams] == [f"requests-{band}" for band in keys.BANDS]
    assert len({t["metadata"]["consumerGroup"] for t in streams} | {keys.WORKER_GROUP}) == 1
    assert [t["metadata"]["listName"] for t in waiting] == keys.waiting_counts(pool)
    assert [t["name"] for t in waiting] == [f"waiting-{band}" for band in keys.BANDS]


def test_event_retention_is_the_same_for_both_processes(chart: helm.Chart) -> None:
    objects = render(chart, {"eventTTLSeconds": 900})
    assert env_value(frontend(objects), "MISTRAL_SERVE_EVENT_TTL_S") == "900"
    assert env_value(worker(objects), "MISTRAL_SERVE_EVENT_TTL_S") == "900"


def test_reattach_grace_and_worker_lease_reach_the_processes(chart: helm.Chart) -> None:
    objects = render(
        chart, {"detachGraceSeconds": 45, "worker": {"leaseMilliseconds": 8000, "fairQuantumTokens": 2048}}
    )
    assert env_value(frontend(objects), "MISTRAL_SERVE_DETACH_GRACE_S") == "45"
    assert env_value(worker(objects), "MISTRAL_SERVE_LEASE_MS") == "8000"
    assert env_value(worker(objects), "MISTRAL_SERVE_FAIR_QUANTUM_TOKENS") == "2048"
    defaults = render(chart, {})
    assert env_value(frontend(defaults), "MISTRAL_SERVE_DETACH_GRACE_S") == "30"
    assert env_value(worker(defaults), "MISTRAL_SERVE_LEASE_MS") == "3000"
    # The chart's default is the worker's own (a value nobody set means the same in and out of Kubernetes).
    assert env_value(worker(defaults), "MISTRAL_SERVE_FAIR_QUANTUM_TOKENS") == str(
        WorkerSettings.fair_quantum_tokens
    )


# --- scaling and disruption ---------------------------------------------------------------------


def test_frontend_hpa_owns_the_replica_count(chart: helm.Chart) -> None:
    objects = render(chart, {})
    assert "replicas" not in frontend(objects)["spec"]
    hpa = one(objects, "HorizontalPodAutoscaler", f"{FULLNAME}-frontend")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{FULLNAME}-frontend",
    }
    fixed = render(chart, TOGGLES["fixed-replicas"])
    assert frontend(fixed)["spec"]["replicas"] == 3
    assert worker(fixed)["spec"]["replicas"] == 2
    assert not [o for o in fixed if o["kind"] in {"HorizontalPodAutoscaler", "PodDisruptionBudget"}]


def test_both_components_have_disruption_budgets(chart: helm.Chart) -> None:
    objects = render(chart, {})
    for component in ("frontend", "worker"):
        pdb = one(objects, "PodDisruptionBudget", f"{FULLNAME}-{component}")
        assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == component
        assert pdb["spec"]["maxUnavailable"] >= 1


def test_keda_scales_workers_on_the_request_stream(chart: helm.Chart) -> None:
    objects = render(chart, {"keda": {"enabled": True}})
    assert "replicas" not in worker(objects)["spec"]
    scaled = one(objects, "ScaledObject", f"{FULLNAME}-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == f"{FULLNAME}-worker"
    assert scaled["spec"]["minReplicaCount"] >= 1
    triggers = scaled["spec"]["triggers"]
    assert len(triggers) == 2 * len(keys.BANDS)
    for trigger in triggers:
        meta = trigger["metadata"]
        assert meta["address"] == f"{FULLNAME}-redis.{NAMESPACE}.svc:6379"
        if trigger["type"] == "redis-streams":
            assert meta["consumerGroup"] == keys.WORKER_GROUP
            assert int(meta["pendingEntriesCount"]) < int(
                env_value(worker(objects), "MISTRAL_SERVE_WORKER_MAX_INFLIGHT")
            )
        else:
            assert trigger["type"] == "redis" and meta["listLength"] == "16"
        assert all(isinstance(v, str) for v in meta.values())
        # The in-chart Redis has a password, which KEDA reads from the same Secret as the processes.
        auth = one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": REDIS_AUTH_SECRET, "key": "password"}
    ]


@pytest.mark.parametrize("toggle", ["keda-lag-scale-to-zero", "keda-pending-scale-to-zero"])
def test_keda_waiting_lists_wake_a_pool_at_zero_for_every_band(chart: helm.Chart, toggle: str) -> None:
    scaled = one(render(chart, TOGGLES[toggle]), "ScaledObject", f"{FULLNAME}-worker")
    assert scaled["spec"]["minReplicaCount"] == 0
    # Waiting requests are in the fair queue's lists, not the streams: their lengths wake the pool.
    lists = {t["metadata"]["listName"] for t in scaled["spec"]["triggers"] if t["type"] == "redis"}
    assert lists == set(keys.waiting_counts("default"))


def test_keda_authenticates_to_external_redis_from_secrets(chart: helm.Chart) -> None:
    objects = render(chart, TOGGLES["keda-external-redis"])
    trigger, *_ = one(objects, "ScaledObject", f"{FULLNAME}-worker")["spec"]["triggers"]
    assert trigger["metadata"]["address"] == "redis.data.svc:6380"
    assert trigger["metadata"]["databaseIndex"] == "1"
    assert trigger["metadata"]["enableTLS"] == "true"
    assert trigger["metadata"]["streamLength"] == "48"
    auth = one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {"password": ("redis-auth", "password"), "ca": ("redis-ca", "ca.crt")}


def test_keda_defaults_port_of_an_external_url_without_one(chart: helm.Chart) -> None:
    values = merged(TOGGLES["external-redis-plain"], {"keda": {"enabled": True}})
    objects = render(chart, values)
    trigger, *_ = one(objects, "ScaledObject", f"{FULLNAME}-worker")["spec"]["triggers"]
    # No password and no CA: KEDA needs no TriggerAuthentication.
    assert "authenticationRef" not in trigger
    assert not [o for o in objects if o["kind"] == "TriggerAuthentication"]
    assert trigger["metadata"]["address"] == "redis.data.svc:6379"
    assert trigger["metadata"]["databaseIndex"] == "0"
    assert "enableTLS" not in trigger["metadata"]


@pytest.mark.parametrize(
    ("keda", "message"),
    [
        ({"target": 64}, "below worker.maxInflight"),
        ({"minReplicaCount": 5, "maxReplicaCount": 2}, "maxReplicaCount"),
    ],
)
def test_keda_settings_that_cannot_scale_are_refused(chart: helm.Chart, keda: Values, message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, {"keda": {"enabled": True, **keda}})


# --- monitoring and network -------------------------------------------------------------------


def test_service_monitors_scrape_the_metrics_ports(chart: helm.Chart) -> None:
    objects = render(chart, TOGGLES["observability"])
    for component in ("frontend", "worker"):
        monitor = one(objects, "ServiceMonitor", f"{FULLNAME}-{component}")
        assert monitor["metadata"]["labels"]["release"] == "prom"
        service = one(objects, "Service", f"{FULLNAME}-{component}")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
        assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
        deployment = one(objects, "Deployment", f"{FULLNAME}-{component}")
        ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        assert str(ports["metrics"]) == env_value(deployment, "MISTRAL_SERVE_METRICS_PORT")


def test_otel_protocol_allows_exactly_what_the_services_export(chart: helm.Chart) -> None:
    # A protocol the code refuses would leave tracing off in every pod: the schema must refuse it first.
    for protocol in OTLP_PROTOCOLS:
        chart.validate_schema(chart.merge_values({"otel": {"protocol": protocol}}))
    for protocol in ("http/json", "http"):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(chart.merge_values({"otel": {"protocol": protocol}}))
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert tuple(schema["properties"]["otel"]["properties"]["protocol"]["enum"]) == OTLP_PROTOCOLS


def test_otel_settings_reach_both_processes(chart: helm.Chart) -> None:
    objects = render(chart, TOGGLES["observability"])
    for component in ("frontend", "worker"):
        deployment = one(objects, "Deployment", f"{FULLNAME}-{component}")
        assert env_value(deployment, "OTEL_EXPORTER_OTLP_ENDPOINT") == "http://otel.obs:4317"
        assert env_value(deployment, "OTEL_SERVICE_NAME") == f"mistral-serve-{component}"
        assert env_value(deployment, "OTEL_TRACES_SAMPLER") == "parentbased_traceidratio"
        assert "env=test" in env_value(deployment, "OTEL_RESOURCE_ATTRIBUTES")
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env_of(frontend(render(chart, {})))


def test_only_the_release_reaches_the_in_chart_redis_by_default(chart: helm.Chart) -> None:
    objects = render(chart, {})
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert [p["metadata"]["name"] for p in policies] == [f"{FULLNAME}-redis"]
    spec = policies[0]["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    assert spec["policyTypes"] == ["Ingress"]
    [rule] = spec["ingress"]
    assert [s["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for s in rule["from"]] == [
        "frontend",
        "worker",
    ]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    assert not [o for o in render(chart, TOGGLES["redis-ephemeral-open"]) if o["kind"] == "NetworkPolicy"]


def test_network_policies_fence_redis_workers_and_frontends(chart: helm.Chart) -> None:
    objects = render(chart, TOGGLES["network-policies"])
    redis = one(objects, "NetworkPolicy", f"{FULLNAME}-redis")["spec"]["ingress"]
    [rule] = redis
    sources = rule["from"]
    components = {
        s["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for s in sources if "podSelector" in s
    }
    assert components == {"frontend", "worker"}
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}} in sources
    front = one(objects, "NetworkPolicy", f"{FULLNAME}-frontend")["spec"]["ingress"]
    callers_rule = next(r for r in front if r["ports"][0]["port"] == "grpc")
    allowed = callers_rule["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"]
    assert allowed == [NAMESPACE, "apps"]
    # Callers reach both doors, gRPC and the OpenAI-compatible HTTP API, and nothing else.
    assert [p["port"] for p in callers_rule["ports"]] == ["grpc", "http"]
    workers = one(objects, "NetworkPolicy", f"{FULLNAME}-worker")["spec"]["ingress"]
    assert [p["port"] for r in workers for p in r["ports"]] == ["metrics"]
    closed = render(chart, TOGGLES["network-policies-no-metrics"])
    assert one(closed, "NetworkPolicy", f"{FULLNAME}-worker")["spec"]["ingress"] == []


# --- values and schema -------------------------------------------------------------------------


def test_schema_is_valid_draft7() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART_DIR / "values.yaml").read_text()))


BAD_VALUES: dict[str, Values] = {
    "unknown-top-level-key": {"replicaCount": 3},
    "unknown-worker-key": {"worker": {"gpus": 2}},
    "tensor-parallel-3": {"worker": {"engine": {"tensorParallelSize": 3}}},
    "gpu-memory-over-1": {"worker": {"engine": {"gpuMemoryUtilization": 1.5}}},
    "context-beyond-model": {"worker": {"engine": {"maxModelLen": 262144}}},
    "too-many-images": {"worker": {"engine": {"maxImagesPerPrompt": 11}}},
    "log-format": {"logFormat": "xml"},
    "port-out-of-range": {"frontend": {"grpcPort": 70000}},
    "negative-drain": {"worker": {"drainGraceSeconds": -1}},
    "drain-as-string": {"frontend": {"drainGraceSeconds": "30"}},
    "pool-with-colon": {"pool": "a:b"},
    "http-redis-url": {"redis": {"internal": {"enabled": False}, "external": {"url": "http://redis:6379"}}},
    "keda-trigger": {"keda": {"trigger": "cpu"}},
    "cache-type": {"worker": {"modelCache": {"type": "nfs"}}},
    "sampler-arg": {"otel": {"samplerArg": "2"}},
    "secret-name": {"frontend": {"auth": {"existingSecret": "Bad_Name"}}},
    "namespace-name": {"networkPolicy": {"allowedNamespaces": ["Apps!"]}},
    "pdb-zero": {"worker": {"pdb": {"maxUnavailable": 0}}},
    "auth-enabled-string": {"frontend": {"auth": {"enabled": "yes"}}},
    "http-port-string": {"frontend": {"httpPort": "8000"}},
    "probe-protocol": {"frontend": {"probes": {"protocol": "tcp"}}},
    "redis-fsync-no": {"redis": {"internal": {"persistence": {"appendfsync": "no"}}}},
    "redis-secret-name": {"redis": {"internal": {"auth": {"existingSecret": "Bad_Name"}}}},
    "redis-persistence-string": {"redis": {"internal": {"persistence": {"enabled": "true"}}}},
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(chart: helm.Chart, case: str) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values(BAD_VALUES[case]))
    with pytest.raises(helm.HelmValuesError):
        render(chart, BAD_VALUES[case])


@pytest.mark.parametrize("case", sorted(CASES))
def test_schema_accepts_every_values_set(chart: helm.Chart, case: str) -> None:
    chart.validate_schema(chart.merge_values(CASES[case]))


KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_./\"-]+):(?P<rest>.*)$")


def undocumented_values(text: str) -> list[str]:
    """Keys of values.yaml that neither carry a `# --` comment nor sit inside a value that does.

    A mapping with no comment of its own is a section: its keys are checked one by one.
    """
    lines = text.splitlines()

    def doc_comment_above(index: int) -> bool:
        block: list[str] = []
        j = index - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.insert(0, lines[j].strip())
            j -= 1
        return bool(block) and block[0].startswith("# --")

    def is_section(index: int, indent: int) -> bool:
        for nxt in lines[index + 1 :]:
            if not nxt.strip() or nxt.strip().startswith("#"):
                continue
            deeper = len(nxt) - len(nxt.lstrip(" ")) > indent
            return deeper and not nxt.strip().startswith("- ")
        return False

    missing: list[str] = []
    stack: list[tuple[int, str, bool]] = []
    for index, line in enumerate(lines):
        match = KEY_LINE.match(line)
        if not match or line.strip().startswith(("#", "- ")):
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = doc_comment_above(index)
        inherited = any(doc for _, _, doc in stack)
        path = ".".join([key for _, key, _ in stack] + [match["key"]])
        section = not match["rest"].strip() and is_section(index, indent)
        if not (documented or inherited or section):
            missing.append(path)
        stack.append((indent, match["key"], documented))
    return missing


def test_every_value_has_a_doc_comment() -> None:
    assert undocumented_values((CHART_DIR / "values.yaml").read_text()) == []


def test_doc_comment_check_finds_an_undocumented_value() -> None:
    text = "# -- documented\na: 1\nsection:\n  # -- documented\n  b: 2\n  c: 3\n"
    assert undocumented_values(text) == ["section.c"]


def test_example_files_only_set_known_values(chart: helm.Chart) -> None:
    assert {path.stem for path in EXAMPLES} == {"trial-values", "production-values"}
    production = yaml.safe_load((CHART_DIR / "examples" / "production-values.yaml").read_text())
    assert production["redis"]["internal"]["enabled"] is False
    assert production["keda"]["enabled"] is True
    trial = render(chart, yaml.safe_load((CHART_DIR / "examples" / "trial-values.yaml").read_text()))
    assert worker(trial)["spec"]["replicas"] == 1
    one(trial, "Deployment", f"{FULLNAME}-redis")


def test_sentinel_mode_reaches_both_processes_as_one_settings_block(chart: helm.Chart) -> None:
    external = EXTERNAL_REDIS["redis"]["external"]
    objects = render(
        chart,
        {
            "redis": {
                "internal": {"enabled": False},
                "waitReplicas": 1,
                "external": {
                    **external,
                    "url": "rediss://mymaster/0",
                    "mode": "sentinel",
                    "tlsClientCertSecret": {"name": "redis-client"},
                    "sentinel": {
                        "masterName": "mymaster",
                        "addresses": ["s0.data.svc:26379", "s1.data.svc:26379"],
                        "passwordSecret": {"name": "sentinel-auth", "key": "password"},
                    },
                },
            }
        },
    )
    for deployment in (frontend(objects), worker(objects)):
        env = env_of(deployment)
        assert env["MISTRAL_SERVE_REDIS_MODE"]["value"] == "sentinel"
        assert env["MISTRAL_SERVE_REDIS_SENTINELS"]["value"] == "s0.data.svc:26379,s1.data.svc:26379"
        assert env["MISTRAL_SERVE_REDIS_SENTINEL_MASTER"]["value"] == "mymaster"
        assert (
            env["MISTRAL_SERVE_REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
            == "sentinel-auth"
        )
        assert env["MISTRAL_SERVE_REDIS_WAIT_REPLICAS"]["value"] == "1"
        cert = Path(env["MISTRAL_SERVE_REDIS_TLS_CERT_FILE"]["value"])
        assert Path(env["MISTRAL_SERVE_REDIS_TLS_KEY_FILE"]["value"]).parent == cert.parent
        assert volumes_of(deployment)[mounts_of(deployment)[str(cert.parent)]]["secret"] == {
            "secretName": "redis-client"
        }


def test_an_unknown_redis_mode_is_refused(chart: helm.Chart) -> None:
    values = {
        "redis": {
            "internal": {"enabled": False},
            "external": {**EXTERNAL_REDIS["redis"]["external"], "mode": "ring"},
        }
    }
    with pytest.raises(helm.HelmValuesError, match="mode"):
        render(chart, values)
