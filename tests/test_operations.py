"""The operations kit: the Prometheus alert rules (checked and unit-tested by promtool, every
metric they name exported by /metrics), the systemd unit (verified by systemd-analyze, its
sandbox scored), and the demo's closing hint naming a command that runs.

``make promtool`` installs Debian's prometheus package (promtool) when it is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from sessionmgr import config, demo
from sessionmgr.client import LemonSliceClient
from sessionmgr.clock import FakeClock
from sessionmgr.errors import LemonSliceError
from sessionmgr.manager import SessionManager
from sessionmgr.metrics import Metrics
from sessionmgr.testing import FakeLemonSlice, Fault
from sessionmgr.web import create_app

from .helpers import FAKE_API_KEY, TEST_RETRY, TEST_TIMEOUTS

ROOT = Path(__file__).parent.parent
RULES = ROOT / "docs" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "docs" / "prometheus" / "alerts_test.yml"
UNIT = ROOT / "docs" / "systemd" / "sessionmgr.service"
ENV_FILE = ROOT / "docs" / "systemd" / "sessionmgr.env"
MAX_EXPOSURE = 2.0  # systemd-analyze security's score of the unit (0 best, 10 worst)
ALERTS = {
    "SessionmgrReaperNotRunning",
    "SessionmgrReaperStale",
    "SessionmgrTerminateFailuresClimbing",
    "SessionmgrOrphansFound",
    "SessionmgrDatabaseDown",
    "SessionmgrNoCredits",
}


def tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).exists():
        pytest.fail(f"no {name}: run `make promtool` (apt-get install prometheus systemd)")
    return path


# --- alert rules -------------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_show_each_alert_firing_and_quiet() -> None:
    result = subprocess.run(
        [tool("promtool"), "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        cwd=RULE_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == ALERTS == set(re.findall(r"alert: (\w+)", RULES.read_text()))


def rule_metrics() -> set[str]:
    exprs = re.findall(r"^\s+expr: (.+)$", RULES.read_text(), flags=re.MULTILINE)
    return {name for expr in exprs for name in re.findall(r"\bsessionmgr_\w+", expr)}


async def test_every_metric_the_rules_name_is_in_metrics(tmp_path: Path, clock: FakeClock) -> None:
    metrics = Metrics()
    async with FakeLemonSlice(api_key=FAKE_API_KEY, clock=clock) as lemon:
        client = LemonSliceClient(
            FAKE_API_KEY,
            api_url=lemon.url,
            retry=TEST_RETRY,
            timeouts=TEST_TIMEOUTS,
            trace_configs=[metrics.trace_config()],
        )
        manager = SessionManager(
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'm.db'}",
            client=client,
            clock=clock,
            auto_upgrade=True,
        )
        async with client, manager:
            lemon.inject("create", Fault.status(402, '{"detail": "not enough credits"}'))
            with pytest.raises(LemonSliceError):  # 402: no credits
                await manager.create_session(agent_id="a")
            app = create_app(manager, admin_token=None, metrics=metrics)
            async with TestClient(TestServer(app)) as api:
                text = await (await api.get("/metrics")).text()
    samples = {
        sample.name: sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    missing = rule_metrics() - set(samples)
    assert not missing, f"alerts.yml names metrics /metrics does not export: {missing}"
    paid = [
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "sessionmgr_api_payment_required_total"
    ]
    assert {s.labels["endpoint"]: s.value for s in paid} == {
        "create": 1.0,
        "get": 0.0,
        "list": 0.0,
        "terminate": 0.0,
    }
    assert samples["sessionmgr_reaper_up"].value == 1.0
    assert samples["sessionmgr_reaper_interval_seconds"].value == config.REAPER_INTERVAL
    assert samples["sessionmgr_reaper_last_tick_age_seconds"].value >= 0.0


async def test_reaper_metrics_say_when_no_reaper_runs(
    manager: SessionManager,
) -> None:
    text = (await Metrics().scrape(manager)).decode()
    assert "sessionmgr_reaper_up 0.0" in text
    assert (
        "sessionmgr_reaper_last_tick_age_seconds" not in text
    )  # no number rather than a wrong one


# --- systemd unit ------------------------------------------------------------------------------


def installed_unit(tmp_path: Path) -> Path:
    """The example unit pointed at this checkout's virtualenv and files under tmp_path."""
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("sessionmgr.env", "lemonslice-api-key", "admin-token"):
        (etc / name).write_text("x\n")
    unit = tmp_path / "sessionmgr.service"
    text = UNIT.read_text().replace("/opt/sessionmgr/.venv/bin", str(Path(sys.executable).parent))
    unit.write_text(text.replace("/etc/sessionmgr/", f"{etc}/"))
    return unit


def test_systemd_verifies_the_unit(tmp_path: Path) -> None:
    unit = installed_unit(tmp_path)
    result = subprocess.run(
        [tool("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""  # unknown keys are only warned about


def test_the_unit_runs_sandboxed(tmp_path: Path) -> None:
    unit = installed_unit(tmp_path)
    result = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_the_unit_and_its_environment_file_name_what_serve_reads() -> None:
    unit = UNIT.read_text()
    assert re.search(r"^ExecStart=\S+/sessionmgr serve$", unit, flags=re.MULTILINE)
    for variable in (config.ENV_API_KEY_FILE, config.ENV_ADMIN_TOKEN_FILE):
        assert f"Environment={variable}=%d/" in unit
    names = re.findall(r"^#?\s*([A-Z_]+)=", ENV_FILE.read_text(), flags=re.MULTILINE)
    known = {v for k, v in vars(config).items() if k.startswith("ENV_")}
    known |= {f"SESSIONMGR_{field.upper()}" for field in config.FLAGS}
    known |= {"SESSIONMGR_REAPER_BATCH"}
    assert names
    assert set(names) <= known, set(names) - known
    assert "LEMONSLICE_API_KEY=" not in ENV_FILE.read_text()  # secrets are credentials


# --- the demo's closing hint -------------------------------------------------------------------


def test_the_demo_names_the_command_as_it_runs_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    script = venv_bin / "sessionmgr"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [".venv/bin/sessionmgr", "demo"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a fresh shell: the virtualenv not activated
    assert demo.command_hint() == ".venv/bin/sessionmgr"
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")  # after `. .venv/bin/activate`
    assert demo.command_hint() == "sessionmgr"
    monkeypatch.setattr(sys, "argv", ["/somewhere/sessionmgr/__main__.py", "demo"])
    assert demo.command_hint().endswith(" -m sessionmgr")


@pytest.mark.slow
def test_make_demo_ends_with_a_command_that_runs(tmp_path: Path) -> None:
    """What `make demo` runs, from a fresh shell; then the hint's command, as printed."""
    sessionmgr = Path(sys.executable).parent / "sessionmgr"
    result = subprocess.run(
        [str(sessionmgr), "demo", "--database", str(tmp_path / "demo.db")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    [hint] = [line for line in result.stdout.splitlines() if line.startswith("try: ")]
    command = hint.removeprefix("try: ").split()
    try:
        assert command[0] == str(sessionmgr.relative_to(ROOT))  # `.venv/bin/sessionmgr`
    except ValueError:  # a virtualenv outside the checkout
        assert command[0] == str(sessionmgr)
    assert "(or `sessionmgr ...` after `. " in result.stdout
    again = subprocess.run(
        command, capture_output=True, text=True, timeout=60, cwd=ROOT, env={"PATH": "/usr/bin"}
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("ended") >= 6
