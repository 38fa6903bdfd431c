"""What an operator installs beside tack: the systemd unit and the
supervisord program, checked by the tools that read them."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_the_systemd_unit_verifies_and_is_hardened(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    unit = (SCRIPTS / "tack.service").read_text()
    # verify checks that ExecStart exists: point it at this Python.
    local = tmp_path / "tack.service"
    local.write_text(unit.replace("/opt/tack/.venv/bin/python", sys.executable))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in done.stderr.splitlines() if str(local) in line]
    assert done.returncode == 0 and complaints == [], done.stderr
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.optionxform = str
    service.read_string(unit)
    settings = service["Service"]
    assert settings["KillMode"] == "control-group"  # builds die with tack
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["Restart"] == "on-failure" and settings["RestartPreventExitStatus"] == "2"
    assert settings["DynamicUser"] == "yes"
    assert settings["StateDirectory"] == "tack" and settings["LogsDirectory"] == "tack"
    assert settings["Type"] == "exec"


def test_the_supervisord_program_names_a_user_and_its_folders():
    program = configparser.ConfigParser(interpolation=None)
    program.read(SCRIPTS / "supervisord.conf")
    tack = program["program:tack"]
    assert tack["user"] == "tack" and tack["directory"] == "/var/lib/tack"
    text = (SCRIPTS / "supervisord.conf").read_text()
    assert "useradd" in text and "install -d" in text  # the steps before it loads
