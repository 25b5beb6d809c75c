"""The service files in scripts/: sandboxed, never installing on start, and
pointing at the home the CLI uses by default. scripts/check-service does the
systemd-analyze part; these tests run it."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.paths import default_home

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
UNIT = SCRIPTS / "ctxfs.service"
PLIST = SCRIPTS / "dev.ctxfs.daemon.plist"
CHECK = SCRIPTS / "check-service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_runs_the_installed_entry_point_and_waits_for_no_system_target():
    settings = unit_settings()
    assert settings["ExecStart"] == ["%h/ctxfs/.venv/bin/ctxfs daemon"]  # not scripts/ctxfs: no pip install
    for key in ("After", "Wants", "Requires"):
        assert not any("network-online" in v for v in settings.get(key, [])), key


@pytest.mark.parametrize("key, value", [
    ("NoNewPrivileges", "yes"), ("PrivateUsers", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "read-only"),
    ("PrivateTmp", "yes"), ("CapabilityBoundingSet", ""), ("LockPersonality", "yes"),
    ("MemoryDenyWriteExecute", "yes"), ("RestrictNamespaces", "yes"), ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"), ("ProtectKernelLogs", "yes"), ("SystemCallFilter", "@system-service"),
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK"), ("UMask", "0077"),
])
def test_the_unit_is_sandboxed(key, value):
    assert value in unit_settings()[key]


def test_the_unit_can_write_the_home_the_cli_uses_by_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    relative = default_home().relative_to(tmp_path)
    paths = unit_settings()["ReadWritePaths"][0].split()
    assert f"-%h/{relative}" in paths  # the default home
    assert f"-%h/{relative.parent}/contextfs" in paths  # and one made under the old name


def test_the_launchd_agent_runs_the_installed_entry_point():
    with open(PLIST, "rb") as f:
        agent = plistlib.load(f)
    assert agent["ProgramArguments"] == ["/Users/USER/ctxfs/.venv/bin/ctxfs", "daemon"]
    assert agent["Umask"] == 0o077
    assert not agent["StandardErrorPath"].startswith("/tmp/")  # a log of one's own, not in a shared directory


# Installing the package that has systemd-analyze may take this long.
INSTALL_BOUND = 600


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    """systemd-analyze, installed (Debian's `systemd` package) when missing
    and this is a root shell with apt-get, as on CI; the tests that need it
    are skipped only where it cannot be had (no apt-get, not root)."""
    found = shutil.which("systemd-analyze")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd"]
        if subprocess.run(install, env=env, capture_output=True, timeout=INSTALL_BOUND).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=INSTALL_BOUND)
            subprocess.run(install, env=env, capture_output=True, timeout=INSTALL_BOUND)
        found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed and cannot be installed here (needs root and apt-get)")
    return found


needs_systemd_analyze = pytest.mark.usefixtures("systemd_analyze")


@needs_systemd_analyze
def test_check_service_passes_and_reports_an_exposure_under_5():
    result = subprocess.run([str(CHECK)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    [score] = [line.split("exposure ")[1].split()[0] for line in result.stdout.splitlines() if "exposure" in line]
    assert float(score) < 5.0


@needs_systemd_analyze
def test_check_service_fails_an_unsandboxed_unit(tmp_path):
    bare = tmp_path / "ctxfs.service"
    bare.write_text(
        "[Unit]\nDescription=x\nAfter=network-online.target\n\n"
        "[Service]\nExecStart=%h/ctxfs/scripts/ctxfs daemon\n\n[Install]\nWantedBy=default.target\n"
    )
    result = subprocess.run([str(CHECK), str(bare)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "network-online.target" in result.stderr and "ExecStart must run" in result.stderr
    assert "must be under 5.0" in result.stderr
