"""deploy/kubernetes: every overlay renders offline, validates, and agrees with the server's own flags.

No cluster here: `kubectl kustomize` renders each overlay as `kubectl apply -k` would, the
core kinds are validated against the Kubernetes schemas of a current release
(`kubernetes-validate`, strict: unknown fields fail), the container arguments are parsed by
`klservice serve`'s own parser in the environment of the image they run in, and the ports,
probes, secrets and the shutdown arithmetic are checked against what the server does with
those arguments. The Prometheus Operator kinds (no schema in that package) are checked
against the compose rule set and by promtool.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess

import pytest
import yaml

from klservice.config import ServerConfig
from klservice.server import FLUSH_SECONDS
from tests.test_deploy import DOCKERFILES, RULES, _dockerfile, _dockerfile_env, _promtool

ROOT = pathlib.Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(path.name for path in (KUBERNETES / "overlays").iterdir() if path.is_dir())
KUBERNETES_VERSION = "1.37.0"  # the newest release kubernetes-validate 1.37.0 carries schemas for
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}  # CustomResourceDefinitions of the Prometheus Operator


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        reason = "kubectl not installed (its `kubectl kustomize` renders the overlays offline)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " -- CI must have it")
        pytest.skip(reason)
    return path


def render(overlay: str) -> list[dict]:
    result = subprocess.run([_kubectl(), "kustomize", str(KUBERNETES / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def one(documents: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in documents if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def serve_config(container: dict, monkeypatch) -> ServerConfig:
    """The container's arguments through `klservice serve`'s parser, with its image's environment in force."""
    from klservice.cli import build_parser

    kind = container["image"].rsplit(":", 1)[-1]
    assert kind in DOCKERFILES, f"image {container['image']!r}: expected the tag of a docker/ image (cpu, gpu)"
    for name in [name for name in os.environ if name.startswith("KLSERVICE_")]:
        monkeypatch.delenv(name)
    for name, value in _dockerfile_env(_dockerfile(DOCKERFILES[kind])).items():
        monkeypatch.setenv(name, value)
    for variable in container.get("env", []):
        monkeypatch.setenv(variable["name"], variable["value"])
    args = build_parser().parse_args(["serve", *container["args"]])
    config = ServerConfig.from_cli_args(args)
    config.model_specs()  # a --model that does not parse fails here
    config.connection_options()
    return config


def container_of(documents: list[dict]) -> dict:
    containers = one(documents, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_and_its_core_kinds_validate_strictly(overlay):
    import kubernetes_validate

    documents = render(overlay)
    kinds = sorted(document["kind"] for document in documents)
    assert kinds == sorted(["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule",
                            "Service", "Service", "ServiceMonitor"])
    for document in documents:
        if document["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)  # raises, naming the field
        assert document["metadata"].get("namespace") == "klservice", document["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_container_arguments_are_serve_flags_that_agree_with_ports_probes_secrets_and_grace(overlay, monkeypatch):
    documents = render(overlay)
    pod = one(documents, "Deployment")["spec"]["template"]["spec"]
    container = container_of(documents)
    config = serve_config(container, monkeypatch)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": config.port, "health": config.health_port, "metrics": config.metrics_port}
    assert config.host == "0.0.0.0" and config.metrics_address == "0.0.0.0", "reachable from other pods"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == config.health_port, probe  # plain gRPC health: no TLS needed
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "a model load may take minutes"

    # Shutdown: the preStop sleep, then the server's own grace and answer flush, all within the pod's grace.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + config.grace_seconds + FLUSH_SECONDS

    # Credentials come from Secrets mounted where the flags point.
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for flag, path, key in (("--auth-file", config.auth_file, "auth.toml"), ("--tls-cert", config.tls_cert, "tls.crt"),
                            ("--tls-key", config.tls_key, "tls.key")):
        assert path, f"{flag} is set"
        folder, name = os.path.split(path)
        assert name == key, f"{flag} {path}: the Secret's key is {key}"
        assert folder in mounts and mounts[folder]["readOnly"], f"{flag}: {folder} is a read-only mount"
        assert "secret" in volumes[mounts[folder]["name"]], f"{flag}: {folder} comes from a Secret"
    assert config.max_connection_age_seconds > 0, "clients re-resolve and reach added replicas"

    gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
    if overlay.startswith("gpu"):
        assert config.backend == "vllm" and config.device == "cuda"
        assert gpus == config.tensor_parallel_size, "one GPU per tensor-parallel rank"
        [model] = config.model_specs()
        model_folder = next(path for path in mounts if model.path.startswith(path + "/"))
        assert mounts[model_folder]["readOnly"]
    else:
        assert gpus == 0 and config.backend == "hf" and config.device == "cpu"
    if config.tensor_parallel_size > 1:
        shm = volumes[mounts["/dev/shm"]["name"]]
        assert shm["emptyDir"]["medium"] == "Memory", "vLLM's workers exchange tensors through /dev/shm"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_budget_policy_and_monitor_select_the_pods_and_ports(overlay):
    documents = render(overlay)
    deployment = one(documents, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = container_of(documents)
    port_names = {port["name"] for port in container["ports"]}

    def selects_pods(selector: dict) -> bool:
        return bool(selector) and all(pod_labels.get(key) == value for key, value in selector.items())

    assert deployment["spec"]["replicas"] >= 2
    headless = one(documents, "Service", "klservice-headless")
    assert headless["spec"]["clusterIP"] == "None", "one DNS record per pod, for client-side balancing"
    assert selects_pods(headless["spec"]["selector"])
    assert [port["targetPort"] for port in headless["spec"]["ports"]] == ["grpc"]
    metrics = one(documents, "Service", "klservice-metrics")
    assert selects_pods(metrics["spec"]["selector"]) and metrics["spec"]["ports"][0]["targetPort"] == "metrics"
    assert selects_pods(one(documents, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])

    policy = one(documents, "NetworkPolicy")["spec"]
    assert selects_pods(policy["podSelector"]["matchLabels"]) and policy["policyTypes"] == ["Ingress"]
    admitted = {}
    for rule in policy["ingress"]:
        [source] = rule["from"]
        for port in rule["ports"]:
            assert port["port"] in port_names
            admitted[port["port"]] = source["namespaceSelector"]["matchLabels"]
    assert admitted == {"grpc": {"klservice.io/trainer": "true"},
                        "metrics": {"kubernetes.io/metadata.name": "monitoring"}}

    monitor = one(documents, "ServiceMonitor")["spec"]
    labels = metrics["metadata"]["labels"]
    assert all(labels.get(key) == value for key, value in monitor["selector"]["matchLabels"].items())
    assert [endpoint["port"] for endpoint in monitor["endpoints"]] == [p["name"] for p in metrics["spec"]["ports"]]
    assert labels[monitor["jobLabel"]] == "klservice", 'the rules and alerts select job="klservice"'


def test_the_prometheus_rule_is_the_compose_rule_set_and_passes_promtool(tmp_path):
    documents = render(OVERLAYS[0])
    groups = one(documents, "PrometheusRule")["spec"]["groups"]
    assert groups == yaml.safe_load(RULES.read_text())["groups"]
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    result = subprocess.run([_promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_config_map_carries_the_dashboard():
    import json

    documents = render(OVERLAYS[0])
    config_map = one(documents, "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "klservice.json").read_text())
    assert json.loads(config_map["data"]["klservice.json"]) == dashboard


def test_the_generated_monitoring_manifests_are_current():
    spec = importlib.util.spec_from_file_location("generate_kubernetes", ROOT / "scripts" / "generate_kubernetes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for path, generate in module.GENERATED.items():
        assert path.read_text() == generate(), f"{path.relative_to(ROOT)} is stale: python scripts/generate_kubernetes.py"
