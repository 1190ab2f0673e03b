"""The Kubernetes manifests agree with the server they run.

Reads the rendered manifests in k8s/rendered/ (kept equal to `kubectl kustomize` of each
kustomization by .ci/k8s.sh, which also validates them against the Kubernetes schemas) and
checks what no schema knows: probe ports and health service names are the server's, the grace
periods are ordered, metrics are scraped where the server serves them, every CLIPSERVE_* variable
is a real server setting with a valid value, the autoscaler reads the metric the adapter rule
serves, and every pod meets the security baseline.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from clipserve.server.app import HEALTH_SERVICES, SERVICE_NAME
from clipserve.server.settings import ServerSettings, from_sources, setting_names

ROOT = Path(__file__).resolve().parents[2]
RENDERED = ROOT / "k8s" / "rendered"
ADAPTER_RULES = ROOT / "k8s" / "monitoring" / "prometheus-adapter-values.yaml"
DEPLOYMENTS = ("gpu", "cpu", "cpu-model-per-pod")
ALL_RENDERED = (*DEPLOYMENTS, "kserve")

#: Triton's metrics port and path, where clipserve serves its nv_inference_* metrics.
METRICS_PORT = 8002
METRICS_PATH = "/metrics"
#: Triton's queue-time formula, which the autoscaling metric must compute.
QUEUE_METRIC = "nv_inference_queue_duration_us"
SUCCESS_METRIC = "nv_inference_request_success"
#: Loading and warming up ViT-L-14 takes minutes: the startup probe must allow at least this.
MIN_STARTUP_BUDGET_S = 300
#: The server reports NOT_SERVING while it rebuilds and warms up a broken session; liveness must
#: not restart it meanwhile.
MIN_LIVENESS_BUDGET_S = 120

Doc = dict[str, Any]


# -- reading ---------------------------------------------------------------------------------
def load(name: str) -> list[Doc]:
    path = RENDERED / f"{name}.yaml"
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def configmap(docs: list[Doc], prefix: str) -> dict[str, str]:
    """A generated ConfigMap's data, found by its name before the content hash."""
    found = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix)
    ]
    assert len(found) == 1, f"expected one ConfigMap {prefix}-*"
    return dict(found[0].get("data", {}))


def server_container(pod: Doc) -> Doc:
    [container] = [c for c in pod["containers"] if c["name"] in ("server", "kserve-container")]
    return container


def container_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The environment a container gets: envFrom ConfigMaps in order, then env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(one(docs, "ConfigMap", name).get("data", {}))
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def pod_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]
        elif doc["kind"] == "InferenceService":
            yield f"InferenceService/{doc['metadata']['name']}", doc["spec"]["predictor"]


def server_settings(env: dict[str, str]) -> ServerSettings:
    """The settings the server would parse from this environment (validated)."""
    return from_sources(environ={k: v for k, v in env.items() if k.startswith("CLIPSERVE_")})


def grpc_port(container: Doc) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return int(ports.get("grpc", ports.get("h2c", -1)))


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def rendered(request: pytest.FixtureRequest) -> list[Doc]:
    return load(request.param)


@pytest.fixture(scope="module")
def deployment(rendered: list[Doc]) -> Doc:
    return one(rendered, "Deployment", "clipserve")


@pytest.fixture(scope="module")
def server(deployment: Doc) -> Doc:
    return server_container(deployment["spec"]["template"]["spec"])


@pytest.fixture(scope="module")
def env(rendered: list[Doc], server: Doc) -> dict[str, str]:
    return container_env(rendered, server)


# -- settings --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_RENDERED)
def test_every_clipserve_variable_is_a_server_setting(name: str) -> None:
    docs = load(name)
    known = set(setting_names())
    keys = {k for d in docs if d["kind"] == "ConfigMap" for k in d.get("data", {})}
    for _, pod in pod_specs(docs):
        for container in pod["containers"] + pod.get("initContainers", []):
            keys |= {e["name"] for e in container.get("env", [])}
    unknown = sorted(k for k in keys if k.startswith("CLIPSERVE_") and k not in known)
    assert not unknown, f"{name}: not server settings: {unknown}"


@pytest.mark.parametrize("name", ALL_RENDERED)
def test_the_server_accepts_its_environment(name: str) -> None:
    docs = load(name)
    for what, pod in pod_specs(docs):
        if what.startswith("Job/"):
            continue
        settings = server_settings(container_env(docs, server_container(pod)))
        assert str(settings.model_repository).startswith("/"), what


def test_the_server_and_the_export_use_one_model_repository(rendered: list[Doc]) -> None:
    model = configmap(rendered, "clipserve-model")["CLIPSERVE_MODEL_REPOSITORY"]
    for what, pod in pod_specs(rendered):
        containers = pod["containers"] + pod.get("initContainers", [])
        for container in containers:
            if container["name"] in ("server", "export"):
                got = container_env(rendered, container)["CLIPSERVE_MODEL_REPOSITORY"]
                assert got == model, f"{what} {container['name']}"
                mounts = {m["mountPath"] for m in container["volumeMounts"]}
                assert any(model.startswith(m + "/") for m in mounts), f"{what}: {model} unmounted"


def test_kserve_mounts_the_exported_repository() -> None:
    docs = load("kserve")
    model = configmap(docs, "clipserve-model")["CLIPSERVE_MODEL_REPOSITORY"]
    claim = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    env = container_env(docs, server_container(one(docs, "InferenceService")["spec"]["predictor"]))
    assert env["STORAGE_URI"] == f"pvc://{claim}/{Path(model).name}"
    assert env["CLIPSERVE_MODEL_REPOSITORY"] == "/mnt/models"  # where KServe mounts it


# -- health probes ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_RENDERED)
def test_probes_ask_the_servers_health_service_on_its_grpc_port(name: str) -> None:
    docs = load(name)
    for what, pod in pod_specs(docs):
        if what.startswith("Job/"):
            continue
        container = server_container(pod)
        port = server_settings(container_env(docs, container)).port
        assert grpc_port(container) == port, what
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            check = container[probe]["grpc"]
            assert check["port"] == port, f"{what} {probe}"
            assert check["service"] in HEALTH_SERVICES, f"{what} {probe}"
        # readiness asks for the API itself, so a pod is routed to only when it can serve it
        assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME, what
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= MIN_STARTUP_BUDGET_S, f"{what}: startup probe allows only {budget}s"
        liveness = container["livenessProbe"]
        budget = liveness["periodSeconds"] * liveness["failureThreshold"]
        assert budget >= MIN_LIVENESS_BUDGET_S, f"{what}: liveness allows only {budget}s"


@pytest.mark.parametrize("name", ALL_RENDERED)
def test_probes_can_reach_health(name: str) -> None:
    docs = load(name)
    for what, pod in pod_specs(docs):
        if what.startswith("Job/"):
            continue
        settings = server_settings(container_env(docs, server_container(pod)))
        # the kubelet's gRPC probes speak plaintext and carry no token
        assert not settings.tls_cert, f"{what}: kubelet gRPC probes cannot speak TLS"
        assert settings.auth_public_health, f"{what}: probes carry no bearer token"


def test_services_reach_the_grpc_port(rendered: list[Doc], deployment: Doc) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Service"}
    assert set(services) == {"clipserve", "clipserve-headless"}
    assert services["clipserve-headless"]["spec"]["clusterIP"] == "None"
    assert services["clipserve-headless"]["spec"].get("publishNotReadyAddresses") is not True
    for service in services.values():
        selector = service["spec"]["selector"]
        assert selector.items() <= labels.items(), service["metadata"]["name"]
        grpc = {p["name"]: p for p in service["spec"]["ports"]}["grpc"]
        assert grpc["port"] == 8001
        assert grpc["targetPort"] == "grpc"
        assert grpc["appProtocol"] == "kubernetes.io/h2c"


# -- shutdown --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_RENDERED)
def test_grace_period_outlasts_pre_stop_and_drain(name: str) -> None:
    docs = load(name)
    for what, pod in pod_specs(docs):
        if what.startswith("Job/"):
            continue
        container = server_container(pod)
        settings = server_settings(container_env(docs, container))
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pre_stop > 0, f"{what}: endpoints need a moment to forget the pod"
        assert pod["terminationGracePeriodSeconds"] > settings.drain_grace_s + pre_stop, what
        # liveness must not kill a draining pod (it reports NOT_SERVING while draining)
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > settings.drain_grace_s


def test_connections_are_recycled_for_rebalancing(env: dict[str, str]) -> None:
    settings = server_settings(env)
    assert settings.max_connection_age_s > 0


def test_rolling_update_keeps_capacity(deployment: Doc) -> None:
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns replicas"
    update = deployment["spec"]["strategy"]["rollingUpdate"]
    assert update["maxUnavailable"] == 0
    assert update["maxSurge"] >= 1


# -- metrics and autoscaling -----------------------------------------------------------------
def test_metrics_port_is_served_and_scraped(
    rendered: list[Doc], deployment: Doc, server: Doc, env: dict[str, str]
) -> None:
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["metrics"] == _metrics_port(env)
    monitor = one(rendered, "ServiceMonitor")
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == METRICS_PATH
    selected = [
        d for d in rendered if d["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
    ]
    scraped = [
        p for s in selected for p in s["spec"]["ports"]
        if p["name"] == "metrics" and p["targetPort"] == "metrics"
    ]
    assert len(scraped) == 1, "exactly one Service port must expose the metrics port"
    policy = one(rendered, "NetworkPolicy", "clipserve-server")
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert {8001, ports["metrics"]} <= allowed


def _metrics_port(env: dict[str, str]) -> int:
    settings = server_settings(env)
    assert settings.metrics, "metrics must be on: the autoscaler reads them"
    assert settings.metrics_port == METRICS_PORT, "Triton's metrics port"
    return settings.metrics_port


def adapter_rules() -> dict[str, Doc]:
    """The Prometheus adapter's rules by the metric name they serve."""
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    return {rule["name"]["as"]: rule for rule in rules}


def ratio_of_rates(query: str) -> tuple[str, str]:
    """The two series of ``sum(rate(A)) / clamp_min(sum(rate(B)), eps)``."""
    numerator, denominator = query.split(" / ")
    pattern = r"rate\((\w+)\{<<\.LabelMatchers>>\}"
    top, bottom = (re.search(pattern, part) for part in (numerator, denominator))
    assert top is not None, query
    assert bottom is not None, query
    return top.group(1), bottom.group(1)


def test_the_adapter_serves_tritons_queue_time_formula() -> None:
    rules = adapter_rules()
    triton = rules["clipserve_queue_duration_us_per_request"]
    assert ratio_of_rates(triton["metricsQuery"]) == (QUEUE_METRIC, SUCCESS_METRIC)
    assert QUEUE_METRIC in triton["seriesQuery"]
    # clipserve.v1 calls are not Triton requests: the per-item histogram covers them
    items = rules["clipserve_queue_duration_seconds_per_item"]
    assert ratio_of_rates(items["metricsQuery"]) == (
        "clipserve_queue_duration_seconds_sum", "clipserve_queue_duration_seconds_count"
    )
    for rule in rules.values():
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "by (<<.GroupBy>>)" in rule["metricsQuery"]


def test_the_autoscaler_reads_what_the_adapter_serves(
    rendered: list[Doc], deployment: Doc
) -> None:
    hpa = one(rendered, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    pods = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert pods == set(adapter_rules())
    resources = [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert resources == ["cpu"]  # the fallback
    assert hpa["spec"]["minReplicas"] >= 2, "one pod left during a drain is no redundancy"
    pdb = one(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )


# -- resources -------------------------------------------------------------------------------
def test_gpu_pods_ask_for_one_gpu_and_run_cuda() -> None:
    docs = load("gpu")
    server = server_container(one(docs, "Deployment")["spec"]["template"]["spec"])
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server_settings(container_env(docs, server)).device.value == "cuda"


@pytest.mark.parametrize("name", ["cpu", "cpu-model-per-pod"])
def test_cpu_pods_ask_for_no_gpu_and_run_on_cpu(name: str) -> None:
    docs = load(name)
    server = server_container(one(docs, "Deployment")["spec"]["template"]["spec"])
    assert "nvidia.com/gpu" not in server["resources"]["limits"]
    assert server_settings(container_env(docs, server)).device.value == "cpu"


def test_threads_fit_the_cpu_limit(server: Doc, env: dict[str, str]) -> None:
    settings = server_settings(env)
    cores = int(server["resources"]["limits"]["cpu"])
    # 0 means "every core the process sees", which in a container is the node's, not the pod's
    assert 0 < settings.intra_op_threads <= cores
    assert 0 < settings.preprocess_workers <= cores
    assert server["resources"]["requests"] == server["resources"]["limits"]  # Guaranteed QoS


# -- security --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_RENDERED)
def test_every_pod_meets_the_security_baseline(name: str) -> None:
    docs = load(name)
    for what, pod in pod_specs(docs):
        assert pod["automountServiceAccountToken"] is False, what
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, what
        assert context["runAsUser"] >= 10000, what
        assert context["seccompProfile"]["type"] == "RuntimeDefault", what
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{what} container {container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in security["capabilities"], where
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp must be writable"
    for account in (d for d in docs if d["kind"] == "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


def test_server_pods_have_no_egress_unless_they_export(rendered: list[Doc]) -> None:
    policy = one(rendered, "NetworkPolicy", "clipserve-server")
    assert "Egress" in policy["spec"]["policyTypes"]
    exports_in_pod = any(
        "initContainers" in pod for what, pod in pod_specs(rendered) if "Deployment" in what
    )
    assert bool(policy["spec"]["egress"]) == exports_in_pod


def test_one_image_for_the_deployment_and_kserve() -> None:
    deployment = one(load("gpu"), "Deployment")["spec"]["template"]["spec"]
    kserve = one(load("kserve"), "InferenceService")["spec"]["predictor"]
    assert server_container(deployment)["image"] == server_container(kserve)["image"]


@pytest.mark.parametrize("name", ALL_RENDERED)
def test_the_server_listens_on_every_interface(name: str) -> None:
    docs = load(name)
    for what, pod in pod_specs(docs):
        if not what.startswith("Job/"):
            host = server_settings(container_env(docs, server_container(pod))).host
            assert host in ("[::]", "0.0.0.0"), f"{what}: probes and Services cannot reach {host}"
