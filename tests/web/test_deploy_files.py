"""The files of ``docs/deploy/`` agree with the service they deploy: the systemd unit is valid
(``systemd-analyze verify``) and its stop timeout, restart rule and settings match the service's;
Prometheus scrapes a route that exists, where the unit and nginx put the service.

(nginx.conf is run for real by tests/e2e/test_proxy.py.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from dotenv import dotenv_values

from tests.system import require_program
from web.openapi import build_document
from web.settings import Settings, load_settings

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "docs" / "deploy"
UNIT = DEPLOY / "imagegen.service"
#: Where the unit expects the checkout; the test points it at this one.
INSTALLED = "/opt/imagegen"


def unit_values(key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", UNIT.read_text(encoding="utf-8"), flags=re.MULTILINE)


def unit_environment() -> dict[str, str]:
    pairs = " ".join(unit_values("Environment")).split()
    return dict(pair.split("=", 1) for pair in pairs)


def test_the_unit_is_valid_for_systemd(tmp_path: Path) -> None:
    analyze = Path(shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze")
    require_program(analyze, "it comes with Debian's systemd package")
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(f"ExecStart={INSTALLED}/.venv/bin/python -m web") == 1
    # This checkout and its interpreter instead of /opt/imagegen, and users that exist here.
    text = text.replace(f"ExecStart={INSTALLED}/.venv/bin/python", f"ExecStart={sys.executable}")
    text = text.replace(f"WorkingDirectory={INSTALLED}", f"WorkingDirectory={ROOT}")
    text = re.sub(r"^(User|Group)=.*$", r"\1=root", text, flags=re.MULTILINE)
    unit = tmp_path / "imagegen.service"
    unit.write_text(text, encoding="utf-8")

    result = subprocess.run(  # noqa: S603 (systemd's own tool on a file of ours)
        [str(analyze), "verify", str(unit)], capture_output=True, text=True, timeout=30, check=False
    )

    # verify exits 0 even for unknown keys and bad values; it only says so.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_unit_waits_out_a_graceful_stop_and_restarts_only_what_can_recover() -> None:
    settings = load_settings(unit_environment())
    (timeout,) = unit_values("TimeoutStopSec")
    assert int(timeout) > settings.shutdown_grace_s + settings.graceful_timeout_s + 1
    assert unit_values("KillSignal") == ["SIGTERM"]
    assert unit_values("Restart") == ["on-failure"]
    # `python -m web` exits 2 for what a restart cannot fix (web/serve.py main()).
    assert unit_values("RestartPreventExitStatus") == ["2"]
    assert "raise SystemExit(2)" in (ROOT / "web" / "serve.py").read_text(encoding="utf-8")


def test_the_unit_sets_only_real_settings_and_trusts_its_proxy() -> None:
    environment = unit_environment()
    assert set(environment) <= set(dotenv_values(ROOT / ".env.example"))
    settings = load_settings(environment)
    assert settings.host == "127.0.0.1"
    assert [str(network) for network in settings.forwarded_allow_ips] == ["127.0.0.1/32"]
    (state,) = unit_values("StateDirectory")
    assert settings.store.database_path.parent == Path("/var/lib") / state
    nginx = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    assert f"server {settings.host}:{settings.port};" in nginx


def test_prometheus_scrapes_the_metrics_route_of_the_service() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] in build_document(Settings())["paths"]
    settings = load_settings(unit_environment())
    (targets,) = [entry["targets"] for entry in job["static_configs"]]
    assert targets == [f"{settings.host}:{settings.port}"]
