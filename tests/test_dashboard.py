"""The Grafana dashboard (deploy/grafana/klservice.json) and its provisioning in docker-compose.yml.

No Grafana server runs here, so the dashboard is checked for what Grafana needs from it and what
its panels ask of Prometheus:

- structure: the `datasource` variable that every panel and query uses, unique panel ids, a PromQL
  `expr` in every query, the model / tenant / job variables;
- names: every metric an expression names is one the server exports (the table in
  klservice/metrics.py), a recording rule of docker/klservice.rules.yml, or `up`; every label it
  filters, groups or writes in a legend is one that metric carries;
- data: a real Prometheus (Debian's `prometheus` package) scrapes three live servers under a short
  mixed load and evaluates every expression, with Grafana's variables substituted as Grafana
  does: "All" (`.*`) and the label values of the load. Each must return a finite value: a panel
  that can never show anything fails, named by its title;
- provisioning: the compose service mounts the datasource and the dashboard where the
  provisioning files say, and the datasource is the compose Prometheus under the uid the
  dashboard's `datasource` variable defaults to.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import pathlib
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import yaml
from prometheus_client import Histogram

from klservice.metrics import METRICS
from tests.test_deploy import PROMETHEUS_CONFIG, RULES, _compose, _free_port, _promtool

ROOT = pathlib.Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "klservice.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DATASOURCES = PROVISIONING / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = PROVISIONING / "dashboards" / "klservice.yml"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
"""What every panel and query names as its datasource: the dashboard's `datasource` variable."""
RATE_INTERVAL = "30s"
"""What Grafana's $__rate_interval stands for here (at least 4 scrape intervals; the test scrapes every second)."""
GRAFANA_GLOBALS = {"__rate_interval": RATE_INTERVAL, "__interval": "5s", "__range": "5m"}
TARGET_LABELS = {"job", "instance"}
"""Labels Prometheus adds to every scraped series."""

# PromQL's functions and aggregation operators: a name followed by "(" that is none of them is taken for a metric.
FUNCTIONS = set("""
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max
    clamp_min count_over_time cos cosh day_of_month day_of_week day_of_year days_in_month deg delta deriv exp
    floor histogram_avg histogram_count histogram_fraction histogram_quantile histogram_stddev histogram_stdvar
    histogram_sum holt_winters double_exponential_smoothing hour idelta increase irate label_join label_replace
    last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi predict_linear
    present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_by_label
    sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp
    vector year
    sum avg min max count group stddev stdvar topk bottomk quantile count_values limitk limit_ratio
""".split())
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
"""Keywords followed by a list of label names."""
KEYWORDS = {"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"}

TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<number>\d[\w.]*)
      | (?P<name>[a-zA-Z_:][\w:]*)
      | (?P<matchers>\{[^}]*\})
      | (?P<other>\S)""",
    re.X,
)
MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_]\w*)\s*\}\}")
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\s*\)\s*$", re.S)


# --------------------------------------------------------------------------- the dashboard as data


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows and the panels of collapsed rows included."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _graph_panels(dashboard: dict) -> list[dict]:
    """The panels that show data (rows only group them)."""
    return [panel for panel in _all_panels(dashboard) if panel["type"] != "row"]


def _variables(dashboard: dict) -> dict[str, dict]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def _variable_query(variable: dict) -> str:
    """A query variable's PromQL: Grafana stores it as a string or as {"query": ...}."""
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else query


def _substitute(text: str, values: dict[str, str]) -> str:
    """`text` with Grafana's variables ($name, ${name}, ${name:format}, [[name]]) replaced by `values`."""

    def replace(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise KeyError(f"undefined variable ${name}")
        return values[name]

    return VARIABLE.sub(replace, text)


def _all_values(dashboard: dict) -> dict[str, str]:
    """Each variable at "All" (its allValue, `.*`), as Grafana sends it, plus Grafana's own variables."""
    values = dict(GRAFANA_GLOBALS)
    for name, variable in _variables(dashboard).items():
        if variable["type"] == "query":
            values[name] = variable.get("allValue") or ".*"
        else:  # the datasource: its default
            values[name] = variable["current"]["value"]
    return values


# --------------------------------------------------------------------------- PromQL names and labels


class Names:
    """What an expression names: each metric with the labels it is filtered by, and the labels it groups by
    (by, without, on, ignoring, group_left, group_right). A name followed by "(" that is no PromQL function
    counts as a metric, so a misspelt function is reported as an unknown metric."""

    def __init__(self, expression: str):
        self.metrics: list[tuple[str, set[str]]] = []
        self.grouping: set[str] = set()
        tokens = [(match.lastgroup, match.group()) for match in TOKEN.finditer(expression)]
        index = 0
        while index < len(tokens):
            kind, text = tokens[index]
            following = tokens[index + 1] if index + 1 < len(tokens) else (None, "")
            if kind == "matchers":  # a selector without a metric name: {__name__=...}
                self.metrics.append(("{...}", set(MATCHER_LABEL.findall(text))))
            elif kind == "name" and text in GROUPING and following[1] == "(":
                index += 2
                while index < len(tokens) and tokens[index][1] != ")":
                    if tokens[index][0] == "name":
                        self.grouping.add(tokens[index][1])
                    index += 1
            elif kind == "name" and text in FUNCTIONS and following[1] in ("(", "by", "without"):
                pass  # a function call, or an aggregation: sum by (...) (...)
            elif kind == "name" and text not in KEYWORDS:
                if following[0] == "matchers":  # name{label="value", ...}
                    self.metrics.append((text, set(MATCHER_LABEL.findall(following[1]))))
                    index += 1
                else:
                    self.metrics.append((text, set()))
            index += 1

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.metrics}


def _recorded_series() -> dict[str, set[str]]:
    """The recording rules' series, each with the labels its outermost `by (...)` keeps (`le` is consumed)."""
    series = {}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                series[rule["record"]] = Names(rule["expr"]).grouping - {"le"}
    return series


def _exported_series() -> dict[str, set[str]]:
    """Every series name Prometheus holds for klservice, with the labels it carries: the server's metrics
    (histograms as _bucket/_sum/_count, counters with _total, info metrics with _info), the recorded series, `up`."""
    series: dict[str, set[str]] = {"up": set(TARGET_LABELS)}
    for spec in METRICS:
        labels = set(spec.labels) | TARGET_LABELS
        if spec.kind is Histogram:
            series[spec.name + "_bucket"] = labels | {"le"}
            series[spec.name + "_sum"] = series[spec.name + "_count"] = labels
        else:
            series[spec.exported_name] = labels
    series.update(_recorded_series())
    return series


def _queries(dashboard: dict) -> list[tuple[str, dict]]:
    """(where, target) of every query of every panel: `where` names the panel by title and the query by refId."""
    return [
        (f"panel {panel['title']!r} query {target.get('refId', '?')}", target)
        for panel in _graph_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def _check_names(where: str, expression: str, exported: dict[str, set[str]]) -> list[str]:
    """Problems of one expression: metrics the server does not export, labels those metrics do not carry."""
    names = Names(expression)
    problems = []
    carried: set[str] = set()
    for name, labels in names.metrics:
        if name not in exported:
            problems.append(f"{where}: {name} is not a metric the server exports")
            continue
        carried |= exported[name]
        for label in sorted(labels - exported[name]):
            problems.append(f"{where}: {name} has no label {label!r}")
    if not names.metrics:
        problems.append(f"{where}: names no metric")
    for label in sorted(names.grouping - carried):
        problems.append(f"{where}: groups by {label!r}, which none of {sorted(names.names)} carries")
    return problems


# --------------------------------------------------------------------------- structure and names


def test_the_dashboard_is_a_current_grafana_dashboard_with_a_datasource_variable():
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 39, "a dashboard of a current Grafana (schemaVersion 39+)"
    assert dashboard["uid"] == "klservice" and dashboard["title"]
    variables = _variables(dashboard)
    datasource = variables.get("datasource")
    assert datasource is not None, "the dashboard needs a `datasource` variable"
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    problems = []
    for panel in _graph_panels(dashboard):
        title = panel.get("title") or f"id {panel.get('id')}"
        if panel.get("datasource") != DATASOURCE:
            problems.append(f"panel {title!r}: datasource {panel.get('datasource')} is not {DATASOURCE}")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"panel {title!r} has no queries")
        for target in targets:
            if target.get("datasource") != DATASOURCE:
                problems.append(f"panel {title!r} query {target.get('refId')}: datasource is not {DATASOURCE}")
            if not str(target.get("expr", "")).strip():
                problems.append(f"panel {title!r} query {target.get('refId')} has no expr")
        refs = [target.get("refId") for target in targets]
        if len(set(refs)) != len(refs):
            problems.append(f"panel {title!r}: refIds {refs} repeat")
    for name, variable in variables.items():
        if variable["type"] == "query" and variable.get("datasource") != DATASOURCE:
            problems.append(f"variable {name}: datasource is not {DATASOURCE}")
    assert not problems, "\n".join(problems)


def test_panel_ids_are_unique_and_panels_do_not_overlap():
    panels = _all_panels(_dashboard())
    titles: dict[int, list[str]] = {}
    for panel in panels:
        assert isinstance(panel.get("id"), int), f"panel {panel.get('title')!r} needs an integer id"
        titles.setdefault(panel["id"], []).append(panel["title"])
    repeated = {id_: names for id_, names in titles.items() if len(names) > 1}
    assert not repeated, f"panel ids repeat: {repeated}"
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} is wider than the dashboard"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"panels {taken[x, y]!r} and {panel['title']!r} overlap"
                taken[x, y] = panel["title"]


def test_model_tenant_and_job_variables_list_the_label_values_of_exported_metrics():
    dashboard = _dashboard()
    variables = _variables(dashboard)
    exported = _exported_series()
    for name, label in {"model": "model", "tenant": "tenant", "job": "trainer_job"}.items():
        assert name in variables, f"the dashboard needs a `{name}` variable"
        variable = variables[name]
        assert variable["type"] == "query" and variable["includeAll"] and variable["allValue"] == ".*"
        query = LABEL_VALUES.match(_variable_query(variable))
        assert query, f"variable {name}: not a label_values(...) query: {_variable_query(variable)!r}"
        assert query["label"] == label, f"variable {name} lists {query['label']!r}, not {label!r}"
        selector = _substitute(query["selector"], _all_values(dashboard))
        problems = _check_names(f"variable {name}", selector, exported)
        assert not problems, "\n".join(problems)
        assert all(label in exported[metric] for metric in Names(selector).names), (
            f"variable {name}: {selector} does not carry {label!r}"
        )


def test_every_expression_names_only_exported_metrics_and_their_labels():
    dashboard = _dashboard()
    exported = _exported_series()
    values = _all_values(dashboard)
    problems = []
    for where, target in _queries(dashboard):
        try:
            expression = _substitute(target["expr"], values)
        except KeyError as error:
            problems.append(f"{where}: {error.args[0]}")
            continue
        problems += _check_names(where, expression, exported)
        carried = set().union(*(exported.get(name, set()) for name in Names(expression).names))
        for label in LEGEND_LABEL.findall(target.get("legendFormat", "")):
            if label not in carried:
                problems.append(f"{where}: the legend names {label!r}, which the expression's metrics do not carry")
    assert not problems, "\n".join(problems)


def test_the_names_check_finds_what_it_is_meant_to():
    """The parser behind the two tests above, on expressions that are wrong in one way each."""
    exported = _exported_series()
    ok = 'histogram_quantile(0.99, sum by (method, le) (rate(klservice_request_seconds_bucket{method="Score"}[30s])))'
    assert _check_names("ok", ok, exported) == []
    assert _check_names("ok", "sum(klservice:requests:rate5m) by (code) and on (code) up", exported) == []
    [misspelt] = _check_names("p", "sum(rate(klservice_tokens_scored[30s]))", exported)
    assert "klservice_tokens_scored is not a metric" in misspelt
    [label] = _check_names("p", 'klservice_queue_depth{tenant="a"}', exported)
    assert "klservice_queue_depth has no label 'tenant'" in label
    [grouping] = _check_names("p", "sum by (code) (rate(klservice_request_seconds_count[30s]))", exported)
    assert "groups by 'code'" in grouping
    [function] = _check_names("p", "rates(klservice_requests_total[30s])", exported)
    assert "rates is not a metric" in function


# --------------------------------------------------------------------------- provisioning


def _mounts(service: dict) -> dict[str, pathlib.Path]:
    """Container path -> repository file of a service's bind mounts."""
    mounts = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = ROOT / source
    return mounts


def test_compose_provisions_grafana_with_the_prometheus_datasource_and_the_dashboard():
    services = _compose()["services"]
    grafana = services["grafana"]
    assert "profiles" not in grafana, "grafana must start with either klservice profile, like prometheus"
    image = grafana["image"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", image), f"pin the Grafana image: {image}"
    assert grafana["ports"] == ["127.0.0.1:3000:3000"], "Grafana shows every tenant's figures: loopback only"
    assert "prometheus" in grafana["depends_on"]
    mounts = _mounts(grafana)
    for target, source in mounts.items():
        assert source.is_file(), f"{source.relative_to(ROOT)} is mounted at {target} but does not exist"
    assert mounts["/etc/grafana/provisioning/datasources/prometheus.yml"] == DATASOURCES
    assert mounts["/etc/grafana/provisioning/dashboards/klservice.yml"] == DASHBOARD_PROVIDERS

    [provider] = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    folder = pathlib.PurePosixPath(provider["options"]["path"])
    [in_container] = [target for target, source in mounts.items() if source == DASHBOARD]
    assert pathlib.PurePosixPath(in_container).parent == folder, "the provider must read the mounted dashboard"
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == in_container

    [datasource] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert datasource["url"] == "http://prometheus:9090"
    assert any(str(port).endswith(":9090") for port in services["prometheus"]["ports"]), "Prometheus listens on 9090"
    default = _variables(_dashboard())["datasource"]["current"]["value"]
    assert datasource["uid"] == default, "the dashboard's datasource variable must default to the provisioned one"
    scrape = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    assert datasource["jsonData"]["timeInterval"] == scrape["klservice"]["scrape_interval"], (
        "timeInterval is the scrape interval: $__rate_interval is computed from it"
    )


# --------------------------------------------------------------------------- every expression against live data

TENANTS = ("team-a", "team-b", "team-q")
KL_JOB = ("team-a", "grpo-run-7")
"""The tenant and trainer job whose ComputeKL calls carry old log-probs: the label values the second pass selects."""


class MixedLoad:
    """What trainers send, round after round, to each replica until stopped: a GRPO group sharing one prompt
    (Score; prompt tokens saved), the same group again (reference-cache hits), ComputeKL with an off-policy
    preset and old log-probs (IS weights, some truncated), and StreamKL items from another tenant's job."""

    def __init__(self, targets: list[str], tokens: dict[str, str]):
        from klservice_client import KLClient

        self.grpo = [KLClient(target, token=tokens["team-a"], job_id=KL_JOB[1]) for target in targets]
        self.ppo = [KLClient(target, token=tokens["team-b"], job_id="ppo-run-3") for target in targets]
        self.rng = np.random.default_rng(18)
        self.rounds = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mixed-load", daemon=True)

    def tokens(self, n: int) -> list[int]:
        return self.rng.integers(5, 49152, size=n).tolist()

    def one_round(self, grpo, ppo) -> None:
        from klservice_client import KLItem

        prompt = self.tokens(32)
        group = [prompt + self.tokens(12) for _ in range(4)]
        reference = grpo.score(group, [32] * 4).ref_logprobs
        assert grpo.score(group, [32] * 4).ref_logprobs.tolist() == reference.tolist()  # from the cache
        logprobs = reference - 0.2
        old_logprobs = logprobs.copy()
        old_logprobs[::5] -= 3.0  # weights of e^3 ~ 20 > openrlhf_unbiased_k2's truncation at 10
        kl = grpo.compute_kl(group, [32] * 4, logprobs=logprobs, old_logprobs=old_logprobs,
                             spec="openrlhf_unbiased_k2")
        assert kl.diagnostics.is_truncated_fraction > 0
        items = []
        for _ in range(3):
            sequence = self.tokens(40)
            items.append(KLItem([sequence], 8, logprobs=np.full(32, -10.5, np.float32), spec="ppo_k1_in_reward"))
        results = list(ppo.stream_kl(items))
        assert len(results) == 3 and all(result.error is None for result in results), results

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for grpo, ppo in zip(self.grpo, self.ppo):
                    self.one_round(grpo, ppo)
                self.rounds += 1
                self._stop.wait(0.2)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error

    def start(self) -> "MixedLoad":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        for client in self.grpo + self.ppo:
            client.close()


def _over_quota_burst(target: str, token: str) -> int:
    """Bursts of concurrent Score calls from team-q (max_queued_tokens 300; 200 tokens each) until the server
    refuses some over the quota (dropped, reason="quota"); returns how many it refused."""
    from klservice_client import KLClient, ServiceOverloaded

    rng = np.random.default_rng(7)
    with KLClient(target, token=token, job_id="burst", max_retries=0) as client, \
            concurrent.futures.ThreadPoolExecutor(12) as pool:
        for _ in range(10):
            calls = [pool.submit(client.score, [rng.integers(5, 49152, size=200).tolist()], 1) for _ in range(12)]
            refused = 0
            for call in calls:
                try:
                    call.result(120)
                except ServiceOverloaded:
                    refused += 1
            if refused:
                return refused
    return 0


class Prometheus:
    """Debian's Prometheus with the shipped config, pointed at `targets`, scraping and evaluating every second."""

    def __init__(self, targets: list[str], directory: pathlib.Path):
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        [job] = config["scrape_configs"]
        del job["dns_sd_configs"]
        job.update(static_configs=[{"targets": targets}], scrape_interval="1s")
        config["rule_files"] = [str(RULES)]
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = _free_port()
        self.process = subprocess.Popen(
            [_promtool("prometheus"), f"--config.file={directory / 'prometheus.yml'}",
             f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )

    def get(self, path: str, **parameters) -> dict:
        """The answer of an HTTP API call; a refused query's error is raised as ValueError."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(parameters, doseq=True)
        try:
            return json.loads(urllib.request.urlopen(url, timeout=10).read())["data"]
        except urllib.error.HTTPError as error:
            raise ValueError(json.loads(error.read()).get("error", str(error))) from None

    def query(self, expression: str) -> list[dict]:
        return self.get("query", query=expression)["result"]

    def value(self, expression: str) -> float | None:
        """The value of an expression that gives one series (None while it gives none)."""
        result = self.query(expression)
        return float(result[0]["value"][1]) if result else None

    def label_values(self, selector: str | None, label: str) -> list[str]:
        """What Grafana's label_values(selector, label) lists."""
        return self.get(f"label/{label}/values", **({"match[]": selector} if selector else {}))

    def wait_until(self, condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read()
            try:
                if condition():
                    return True
            except (OSError, ValueError):
                pass  # not listening yet
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def _problems_with_data(prometheus: Prometheus, queries: list[tuple[str, dict]], values: dict[str, str]) -> list[str]:
    """Each query that returns no finite value, or series without a label its legend names."""
    problems = []
    for where, target in queries:
        expression = _substitute(target["expr"], values)
        try:
            result = prometheus.query(expression)
        except ValueError as error:
            problems.append(f"{where}: Prometheus refuses {expression!r}: {error}")
            continue
        finite = [series for series in result if math.isfinite(float(series["value"][1]))]
        if not finite:
            problems.append(f"{where}: no data ({len(result)} series, none finite) for {expression!r}")
        for label in LEGEND_LABEL.findall(target.get("legendFormat", "")):
            if any(label not in series["metric"] for series in result):
                problems.append(f"{where}: a series has no {label!r} for the legend: {expression!r}")
    return problems


def test_every_expression_returns_data_from_three_live_replicas(start_server, tmp_path):
    """Three servers under a mixed load (Score, ComputeKL off-policy, StreamKL, prompt sharing, cache hits, a
    tenant over its quota), scraped by a real Prometheus that also evaluates the recording rules; then every
    panel's every expression, and every variable's label_values, evaluated at "All" and at the load's labels."""
    from tests.server.test_auth import add_tenant

    _promtool("prometheus")
    dashboard = _dashboard()
    auth = tmp_path / "auth.toml"
    tokens = {tenant: add_tenant(auth, tenant, *(["--max-queued-tokens", "300"] if tenant == "team-q" else []))
              for tenant in TENANTS}
    servers = [start_server(auth_file=str(auth)) for _ in range(3)]
    targets = [f"127.0.0.1:{server.server.metrics_port}" for server in servers]
    prometheus = Prometheus(targets, tmp_path)
    load = None
    try:
        assert _over_quota_burst(servers[0].target, tokens["team-q"]) > 0, "no burst went over team-q's quota"
        load = MixedLoad([server.target for server in servers], tokens).start()
        assert prometheus.wait_until(lambda: prometheus.value('sum(up{job="klservice"})') == 3, timeout=30), (
            "Prometheus does not scrape the three replicas"
        )
        queries = _queries(dashboard)
        variables = _variables(dashboard)
        everything = _all_values(dashboard)

        # Grafana's "All" for every variable; then the load's own labels, each picked from what its
        # variable lists (the chained variables resolved in turn, as Grafana does).
        problems: list[str] = []

        def all_have_data() -> bool:
            problems[:] = _problems_with_data(prometheus, queries, everything)
            return not problems

        prometheus.wait_until(all_have_data, timeout=45)
        assert load.error is None, f"the load failed: {load.error!r}"
        assert not problems, "panels without data at All:\n" + "\n".join(problems)

        chosen = dict(everything)
        wanted = {"model": servers[0].model, "tenant": KL_JOB[0], "job": KL_JOB[1]}
        for name in ("model", "tenant", "job"):
            query = LABEL_VALUES.match(_variable_query(variables[name]))
            listed = prometheus.label_values(_substitute(query["selector"], chosen), query["label"])
            assert wanted[name] in listed, f"variable {name} lists {listed}, not {wanted[name]!r} of the load"
            chosen[name] = wanted[name]  # no regex metacharacters in these names
        assert set(prometheus.label_values(None, "tenant")) >= set(TENANTS)
        problems = _problems_with_data(prometheus, queries, chosen)
        assert not problems, f"panels without data at {wanted}:\n" + "\n".join(problems)
        assert load.rounds >= 1
        print(f"\n{len(_graph_panels(dashboard))} panels, {len(queries)} expressions: each returned data "
              f"at All and at {wanted} after {load.rounds} load rounds on 3 replicas")
    finally:
        if load is not None:
            load.stop()
        prometheus.stop()
        for server in servers:
            server.stop()
