"""deploy/: every Grafana panel's and every Prometheus rule's expression, evaluated by Debian's
real `prometheus` scraping a real server process that has run a known mix of tasks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ROOT, ServerProcess, free_port, wait_for

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "remoterun.json"
# Grafana's template variables, as a dashboard showing every script over a short range sends.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1s", "$__range": "5m",
                "$script": ".*"}
COMPARISON = re.compile(r"^(?P<signal>.*?)\s*(?:==|!=|>=|<=|>|<)\s*[0-9.e+-]+\s*$", re.S)
pytestmark = pytest.mark.slow


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every target of every panel, variables substituted."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARS.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, (panel["title"], expr)
            found.append((panel["title"], expr))
    return found


@pytest.fixture
def remoterun(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server whose alerts go to a port nobody listens on (so deliveries fail, counted)."""
    (tmp_path / "rr").mkdir()
    server = ServerProcess(tmp_path / "rr", f"""
[[alerts]]
kind = "webhook"
url = "http://127.0.0.1:{free_port()}/hook"
retries = 0
timeout_s = 1
""")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prometheus(tmp_path: Path, remoterun: ServerProcess) -> Iterator[str]:
    """Debian's Prometheus on loopback, scraping `remoterun` every second with deploy/'s rules;
    its base URL."""
    binary = shutil.which("prometheus")
    assert binary, "install Debian's prometheus package (make install-system)"
    folder = tmp_path / "prometheus"
    folder.mkdir()
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    config = config.replace('"127.0.0.1:8080"', f'"127.0.0.1:{remoterun.port}"')
    config = config.replace("interval: 15s", "interval: 1s")
    (folder / "prometheus.yml").write_text(config)
    shutil.copy(DEPLOY / "prometheus" / "rules.yml", folder / "rules.yml")
    if shutil.which("promtool"):
        subprocess.run(["promtool", "check", "config", str(folder / "prometheus.yml")],
                       check=True, capture_output=True, timeout=30)
    port = free_port()
    with (folder / "log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"], stdout=log, stderr=log, cwd=folder)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (folder / "log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "Prometheus did not get ready"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def query(http: aiohttp.ClientSession, base: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result; fails unless Prometheus parsed and ran it."""
    async with http.get(f"{base}/api/v1/query", params={"query": expr}) as response:
        body = await response.json()
    assert body.get("status") == "success", (expr, body)
    return body["data"]["result"]  # type: ignore[no-any-return]


async def run_mix(http: aiohttp.ClientSession, url: str) -> None:
    """Successes, failures (one retried), a timeout, output on both streams, a 404."""
    requests = [{"script": "hello.sh"}, {"script": "hello.sh"},
                {"script": "exit.sh", "params": {"code": 3}},
                {"script": "exit.sh", "params": {"code": 3}, "max_retries": 1},
                {"script": "sleep.sh", "params": {"seconds": 30}, "timeout": 0.3},
                {"script": "lines.py", "params": {"n": 200, "both": True}}]
    ids = []
    for body in requests:
        async with http.post(f"{url}/tasks", json=body) as response:
            assert response.status == 201
            ids.append((await response.json())["id"])
    async with http.get(f"{url}/tasks/00000000-0000-4000-8000-000000000000") as response:
        assert response.status == 404

    async def ended() -> bool:
        for task_id in ids:
            async with http.get(f"{url}/tasks/{task_id}") as response:
                if (await response.json())["status"] in ("pending", "running"):
                    return False
        return True

    await wait_for(ended, timeout=20, what="the mix to finish")


async def test_every_panel_and_rule_returns_data(prometheus: str, remoterun: ServerProcess,
                                                 http: aiohttp.ClientSession):
    """Each dashboard panel's and each rule's expression parses and returns series."""
    async def scraped(count: int) -> bool:
        found = await query(http, prometheus,
                            f'count_over_time(up{{job="remoterun"}}[1m]) >= {count}')
        return bool(found)

    await wait_for(lambda: scraped(1), timeout=30, what="Prometheus's first scrape")
    # Two waves a few scrapes apart: the second raises counters the first created, so every
    # rate() and histogram_quantile() has an increase to work on.
    for wave in (1, 2):
        await run_mix(http, remoterun.url)
        samples = await query(http, prometheus, 'count_over_time(up{job="remoterun"}[1m])')
        seen = int(samples[0]["value"][1])
        await wait_for(lambda n=seen: scraped(n + 2), timeout=30,
                       what=f"two scrapes after wave {wave}")

    empty = []
    for title, expr in panel_queries():
        if not await query(http, prometheus, expr):
            empty.append((title, expr))
    assert not empty, f"panels without data: {empty}"

    async def rules() -> list[dict[str, Any]] | None:
        async with http.get(f"{prometheus}/api/v1/rules") as response:
            body = await response.json()
        found = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        evaluated = found and all(r["lastEvaluation"] > "2000" and r["health"] != "unknown"
                                  for r in found)
        return found if evaluated else None

    loaded = await wait_for(rules, timeout=20, what="every rule to be evaluated")
    assert len(loaded) == 5
    for rule in loaded:
        assert rule["health"] == "ok", rule
        await query(http, prometheus, rule["query"])
        signal = COMPARISON.match(rule["query"])
        assert signal, rule["query"]
        assert await query(http, prometheus, signal["signal"]), (rule["name"], signal["signal"])


def test_rules_pass_promtool():
    """promtool accepts deploy/prometheus/rules.yml and the scrape config."""
    check = subprocess.run(["promtool", "check", "rules",
                            str(DEPLOY / "prometheus" / "rules.yml")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 5 rules found" in check.stdout


def test_dashboard_is_import_ready():
    """The dashboard asks for its data source as ${DS_PROMETHEUS}, and every panel uses it."""
    board = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("throughput", "success rate", "duration p95", "queue wait", "running",
                  "failures by reason", "output rate", "clients", "archive", "http errors"):
        assert topic in titles, topic
