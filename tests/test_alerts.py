"""conf/prometheus-alerts.yml and conf/grafana-dashboard.json: valid for
promtool, the alerts fire as tests/prometheus-alerts.test.yml says, and
every expression names only metrics Fido exports."""

import json
import os
import re
import shutil
import subprocess

import yaml
from prometheus_client import generate_latest
from twisted.internet import task

from fido_tx.observe.metrics import Metrics
from fido_tx.observe.status import StatusTracker
from fido_tx.testing import FakeBacklog, FakeRedis, FakeReporter, FakeScheduler
from tests.support.redis_server import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(ROOT, "conf", "prometheus-alerts.yml")
RULES_TEST = os.path.join(ROOT, "tests", "prometheus-alerts.test.yml")
DASHBOARD = os.path.join(ROOT, "conf", "grafana-dashboard.json")
NAME = re.compile(r"\b(fido_[a-z_]+)\b")
#: series Prometheus itself makes, not Fido
PROMETHEUS_OWN = {"up"}


def promtool():
    return require("promtool (Debian package prometheus)", shutil.which("promtool"))


def run(*args):
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _backlog():
    backlog = FakeBacklog()
    backlog.last_length = 0
    return backlog


def exported_names():
    """Every sample name /metrics has with every object bound."""
    metrics = Metrics()
    metrics.bind(scheduler=FakeScheduler(), redis=FakeRedis(), reporter=FakeReporter(),
                 status=StatusTracker(task.Clock(), None, None), backlog=_backlog())
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def alert_expressions():
    with open(RULES) as f:
        doc = yaml.safe_load(f)
    return {rule["alert"]: rule["expr"] for group in doc["groups"] for rule in group["rules"]}


def dashboard_expressions():
    with open(DASHBOARD) as f:
        doc = json.load(f)
    found = [t["expr"] for panel in doc["panels"] for t in panel.get("targets", ())]
    for var in doc["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            found.append(query["query"])
    return found


def test_promtool_check_rules():
    out = run(promtool(), "check", "rules", RULES)
    assert "SUCCESS" in out


def test_promtool_test_rules():
    out = run(promtool(), "test", "rules", RULES_TEST)
    assert "SUCCESS" in out


def test_the_alerts_cover_what_the_operator_needs():
    assert set(alert_expressions()) >= {
        "FidoDown", "FidoNoSuccessfulSession", "FidoAccountsFailing", "FidoBacklogGrowing",
        "FidoRedisDisconnected", "FidoReporterDropping",
    }


def test_every_expression_names_only_metrics_fido_exports():
    exported = exported_names()
    expressions = list(alert_expressions().values()) + dashboard_expressions()
    assert len(expressions) > 20
    for expr in expressions:
        names = set(NAME.findall(expr))
        assert names or "up{" in expr, f"no metric in {expr!r}"
        missing = names - exported
        assert not missing, f"{expr!r} names {missing}, not in /metrics ({sorted(exported)})"


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each dashboard query as a recording rule."""
    exprs = [
        e.replace("$instance", ".*").replace("label_values(fido_accounts, instance)",
                                             "fido_accounts")
        for e in dashboard_expressions()
    ]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"fido:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    assert f"SUCCESS: {len(exprs)} rules found" in run(promtool(), "check", "rules", str(path))


def test_dashboard_panels_have_unique_ids_and_fit_the_grid():
    with open(DASHBOARD) as f:
        doc = json.load(f)
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in doc["panels"])
