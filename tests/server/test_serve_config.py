"""The serve settings declared once (issue 17 §4) and the start-up defects of issue 18: bounds
on every numeric setting (item 11), signals during start-up (item 9), the every-interface
check of the metrics host (item 10)."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gramstyle.cli import main
from gramstyle.server import serve
from gramstyle.server.config import (
    MAX_MESSAGE_MB,
    ServeConfig,
    SettingError,
    flag_table,
)
from gramstyle.server.listen import default_metrics_host, is_every_interface
from gramstyle.sizes import format_size, parse_size

REPO = Path(__file__).resolve().parents[2]
SETTINGS = [s for s in ServeConfig.settings() if s.flag is not None]
BOUNDED = [s for s in SETTINGS if s.high is not None]


@pytest.fixture
def captured(monkeypatch):
    """``gramstyle serve`` up to the server: the ServeConfig it would serve, and no server."""
    seen: list[ServeConfig] = []
    monkeypatch.setattr(serve, "run", lambda config, *signals: seen.append(config) or 0)
    monkeypatch.setattr(serve, "configure_logging", lambda *args: None)
    for name in [n for n in os.environ if n.startswith("GRAMSTYLE_")]:
        monkeypatch.delenv(name)
    return seen


# ------------------------------------------------------------------ the declaration


def test_docs_flag_table_is_generated_from_the_declaration():
    text = (REPO / "docs/service.md").read_text()
    match = re.search(r"<!-- serve-flags-table[^\n]*-->\n(.*?)\n<!-- /serve-flags-table -->",
                      text, re.DOTALL)
    assert match, "docs/service.md lost its serve-flags-table markers"
    assert match.group(1) == flag_table(), (
        "docs/service.md is out of date: paste gramstyle.server.config.flag_table()")


def test_every_numeric_setting_has_both_bounds():
    numeric = [s for s in ServeConfig.settings()
               if s.parse in (int, float, parse_size) or isinstance(s.default, (int, float))
               and not s.switch]
    assert {s.name for s in numeric} >= {"port", "workers", "max_message_mb", "grace_s",
                                         "memory_budget", "max_connection_age_s"}
    for setting in numeric:
        assert setting.low is not None and setting.high is not None, setting.name


def test_help_shows_every_flag_with_its_variable_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for setting in SETTINGS:
        assert setting.flag in text
        assert f"(default {setting.shown_default()}) [env {setting.variable}]" in text, \
            setting.flag


def test_defaults_come_from_the_declaration(captured):
    assert main(["serve"]) == 0
    assert captured[0] == ServeConfig()
    assert ServeConfig().max_message_bytes == 64 * 2**20
    assert (ServeConfig().arch, ServeConfig().weights) == ("vgg19", ("imagenet",))


def test_a_config_built_in_code_is_checked():
    with pytest.raises(SettingError, match=r"^workers: must be >= 1, got 0$") as caught:
        ServeConfig(workers=0)
    assert (caught.value.name, caught.value.value) == ("workers", 0)
    with pytest.raises(ValueError, match=r"^grace_s: must be a number, got nan$"):
        ServeConfig(grace_s=math.nan)
    with pytest.raises(ValueError, match=r"^log_format: must be one of text, json, got 'xml'$"):
        ServeConfig(log_format="xml")
    with pytest.raises(ValueError, match=r"^max_connection_age_s: must be >= 0.01, got 0$"):
        ServeConfig(max_connection_age_s=0)


# ------------------------------------------------------------------ 18.11: bounds


@pytest.mark.parametrize("setting", BOUNDED, ids=lambda s: s.flag)
def test_every_bound_is_exit_2_naming_the_flag(setting, captured, capsys):
    over = setting.high * 2 if isinstance(setting.high, float) else int(setting.high) + 1
    text = str(over) if setting.parse is not parse_size else f"{2 * over // 2**40}T"
    assert main(["serve", setting.flag, text]) == 2
    err = capsys.readouterr().err
    assert f"gramstyle: error: {setting.flag}: must be <= " in err, err
    assert "internal error" not in err and not captured
    if setting.low is not None and setting.low > 0 and setting.parse is not parse_size:
        under = setting.low / 2 if isinstance(setting.low, float) else int(setting.low) - 1
        assert main(["serve", setting.flag, str(under)]) == 2
        assert f"{setting.flag}: must be >= {setting.low:g}" in capsys.readouterr().err


def test_max_message_mb_over_the_grpc_limit(captured, capsys, monkeypatch):
    """Issue 18.11: 2048 MiB overflowed gRPC's C int ("internal error: OverflowError")."""
    assert main(["serve", "--max-message-mb", "2048"]) == 2
    assert "gramstyle: error: --max-message-mb: must be <= 2047, got 2048" in \
        capsys.readouterr().err
    monkeypatch.setenv("GRAMSTYLE_MAX_MESSAGE_MB", "100000")
    assert main(["serve"]) == 2
    assert ("gramstyle: error: GRAMSTYLE_MAX_MESSAGE_MB: must be <= 2047, got 100000 (from "
            "the environment, for --max-message-mb)") in capsys.readouterr().err
    # The flag beats the variable, and the largest allowed value is taken.
    assert main(["serve", "--max-message-mb", str(MAX_MESSAGE_MB)]) == 0
    assert captured[0].max_message_bytes == MAX_MESSAGE_MB * 2**20 < 2**31
    assert not captured[1:]


def test_memory_and_float_settings_from_the_environment(captured, capsys, monkeypatch):
    monkeypatch.setenv("GRAMSTYLE_MEMORY_BUDGET", "2000000T")
    assert main(["serve"]) == 2
    assert "GRAMSTYLE_MEMORY_BUDGET: must be <= 1125899906842624" in capsys.readouterr().err
    monkeypatch.setenv("GRAMSTYLE_MEMORY_BUDGET", "1G")
    monkeypatch.setenv("GRAMSTYLE_GRACE", "inf")
    assert main(["serve"]) == 2
    assert "GRAMSTYLE_GRACE: must be <= 86400, got inf (from the environment, for --grace)" \
        in capsys.readouterr().err
    monkeypatch.setenv("GRAMSTYLE_GRACE", "2.5")
    assert main(["serve"]) == 0
    assert (captured[0].grace_s, captured[0].memory_budget) == (2.5, 2**30)


def test_the_largest_allowed_limits_start_a_server(random_engine):
    """The upper bounds are where gRPC's own types still hold them."""
    config = ServeConfig(host="127.0.0.1", port=0, max_message_mb=MAX_MESSAGE_MB,
                         max_concurrent_streams=100_000, max_connection_age_s=86_400,
                         max_images=1024, queue_size=10_000)
    server = serve.GramstyleServer([random_engine], config).start()
    try:
        assert server.service.limits()["max_message_bytes"] == MAX_MESSAGE_MB * 2**20
    finally:
        server.stop(grace=None)


# ------------------------------------------------------------------ one byte formatter


def test_sizes_parse_and_format():
    assert parse_size("512M") == 512 * 2**20 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("2048") == 2**31
    with pytest.raises(ValueError, match="expected a size such as 512M"):
        parse_size("0")
    assert format_size(512 * 2**20) == "512 MiB"
    assert format_size(3 * 2**30) == "3.00 GiB"
    assert format_size(3 * 2**30, digits=1) == "3.0 GiB"


# ------------------------------------------------------------------ 18.10: every interface


@pytest.mark.parametrize("host", ["[::]", "::", "[::0]", "0:0:0:0:0:0:0:0", "[0::0]",
                                  "0.0.0.0", " 0.0.0.0 ", "0", "0x0", "::ffff:0.0.0.0", "*", ""])
def test_every_interface_in_any_spelling(host):
    assert is_every_interface(host)
    assert default_metrics_host(host) == "127.0.0.1"


@pytest.mark.parametrize("host, metrics_host", [("127.0.0.1", "127.0.0.1"), ("[::1]", "::1"),
                                                ("10.1.2.3", "10.1.2.3"),
                                                ("localhost", "localhost"), ("1", "1")])
def test_a_specific_address_is_kept(host, metrics_host):
    assert not is_every_interface(host)
    assert default_metrics_host(host) == metrics_host


# ------------------------------------------------------------------ 18.9: signals in start-up


@pytest.fixture
def quiet_serve(monkeypatch):
    """serve.run on loopback, port 0, without the ready line's compiled-op check."""
    monkeypatch.setattr(serve.kernels, "load_error", lambda: None)
    return ServeConfig(host="127.0.0.1", port=0, grace_s=5)


def test_stop_during_the_model_load_exits_0(monkeypatch, quiet_serve, capsys):
    previous = signal.getsignal(signal.SIGTERM)
    loaded = []

    def slow_load(config):
        os.kill(os.getpid(), signal.SIGHUP)  # the default action would exit 129
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(300):  # a load that would take 30 s
            time.sleep(0.1)
        loaded.append(config)
        return []

    monkeypatch.setattr(serve, "load_engines", slow_load)
    started = time.monotonic()
    assert serve.run(quiet_serve) == 0
    assert time.monotonic() - started < 10 and not loaded
    assert "ready" not in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is previous  # the handlers are restored


def test_sighup_during_the_load_reloads_once_serving(monkeypatch, quiet_serve, random_engine):
    reloads = []
    monkeypatch.setattr(serve.GramstyleServer, "reload", lambda self: reloads.append(self))

    def load(config):
        os.kill(os.getpid(), signal.SIGHUP)
        return [random_engine]

    monkeypatch.setattr(serve, "load_engines", load)
    # Once the reload ran, stop the server as a kubelet would.
    stopper = threading.Thread(target=lambda: (_wait(lambda: reloads, 60),
                                               os.kill(os.getpid(), signal.SIGTERM)))
    stopper.start()
    try:
        assert serve.run(quiet_serve) == 0
    finally:
        stopper.join(timeout=60)
    assert len(reloads) == 1


def _wait(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def _caught_signals(pid: int) -> int:
    """The mask of signals the process has handlers for (/proc/PID/status SigCgt)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"SigCgt:\s+([0-9a-f]+)", text).group(1), 16)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_signals_during_start_up_of_the_real_command(tmp_path):
    """Issue 18.9: SIGHUP 3 s into start-up exited 129, SIGTERM 143. The handlers come
    before torch is imported; a SIGHUP is survived, a SIGTERM exits 0 before the ready
    line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gramstyle.cli", "serve", "--weights", "random", "--device",
         "cpu", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        wanted = (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGTERM - 1))
        _wait(lambda: process.poll() is not None
              or _caught_signals(process.pid) & wanted == wanted, 60)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert process.poll() is None, "SIGHUP during start-up ended the process"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert "ready on port" not in out
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_metrics_stay_on_loopback_for_an_unspecified_host_spelling(tmp_path):
    """Issue 18.10: --host '[::0]' once put the metrics on every interface."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gramstyle.cli", "serve", "--arch", "vgg16", "--weights",
         "random", "--device", "cpu", "--host", "[::0]", "--port", "0", "--metrics-port",
         "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        ready = process.stdout.readline()
        assert "ready on port" in ready, (ready, process.stderr.read())
        assert "(host 127.0.0.1)" in ready, ready
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
