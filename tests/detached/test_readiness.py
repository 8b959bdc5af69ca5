"""Unit tests of `detached.readiness`: the decisions (no SSH, no API) and the probe on this
machine (a real HTTP server on loopback, a closed port)."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading

import pytest

from prefect_azmanagers.detached.readiness import (
    MAX_WORKER_EXITS, PROBE_ATTEMPTS, PROBE_PATIENCE, WORKER_EXIT_LINE, WORKER_LOG, Probe,
    Readiness, observe_command, parse_observation, parse_probe, probe_command, worker_log_tail,
)
from prefect_azmanagers.exceptions import BootFailed, PrefectAPIUnreachable


def readiness(**overrides) -> Readiness:
    fields = dict(vm="azm-a", api_url="http://10.0.0.4:4200/api",
                  url_source="the manifest's prefect_api_url_for_vms", python="python3",
                  local_cloud=False, timeout=600, now=0.0)
    return Readiness(**{**fields, **overrides})


def error_of(state: Readiness, **observed) -> Exception | None:
    maker = state.verdict(**{"boot_status": None, "worker_exits": 0, "now": 1.0, **observed})
    return None if maker is None else maker("worker log tail", "boot log tail")


def test_nothing_wrong_yet_means_wait():
    assert error_of(readiness()) is None
    assert error_of(readiness(), boot_status="ready", worker_exits=MAX_WORKER_EXITS - 1) is None


def test_a_failed_boot_is_final_at_once():
    error = error_of(readiness(), boot_status="failed: exit 1 at line 40 (hook 1)")
    assert isinstance(error, BootFailed)
    assert "boot script of detached VM azm-a failed (failed: exit 1" in str(error)
    assert "boot log tail" in str(error)


def test_a_worker_that_keeps_exiting_names_the_python_and_customenv():
    error = error_of(readiness(python="/usr/bin/python3"), boot_status="ready",
                     worker_exits=MAX_WORKER_EXITS)
    assert isinstance(error, BootFailed)
    for words in ("keeps exiting", "/usr/bin/python3", "customenv", "worker log tail"):
        assert words in str(error)


def _failing(state: Readiness, probe: Probe, times: int, every: float) -> None:
    for i in range(times):
        state.record_probe(probe, now=i * every)


def test_unreachable_api_needs_several_failures_over_the_patience():
    refused = Probe(None, "ConnectionRefusedError: [Errno 111] Connection refused")
    state = readiness()
    _failing(state, refused, PROBE_ATTEMPTS, 1.0)
    assert error_of(state, now=PROBE_PATIENCE - 1) is None      # failing, but not for long
    state = readiness()
    _failing(state, refused, PROBE_ATTEMPTS - 1, PROBE_PATIENCE)
    assert error_of(state, now=PROBE_PATIENCE * 3) is None      # long, but too few probes
    state = readiness(local_cloud=True)
    _failing(state, refused, PROBE_ATTEMPTS, 1.0)
    error = error_of(state, now=PROBE_PATIENCE)
    assert isinstance(error, PrefectAPIUnreachable)
    for words in ("cannot reach the Prefect API at http://10.0.0.4:4200/api", "Connection refused",
                  "the manifest's prefect_api_url_for_vms", "--prefect-api-url-for-vms",
                  "localcloud start --prefect-api-url"):
        assert words in str(error), str(error)


def test_one_good_probe_ends_probing():
    state = readiness()
    _failing(state, Probe(None, "TimeoutError: timed out"), PROBE_ATTEMPTS - 1, 1.0)
    state.record_probe(Probe(200, ""), now=5.0)
    assert not state.needs_probe
    assert error_of(state, now=PROBE_PATIENCE * 10) is None


@pytest.mark.parametrize("status, words", [
    (401, ["refused by the Prefect API", "PREFECT_API_KEY"]),
    (404, ["HTTP 404", "is not a Prefect API", "/api"]),
    (503, ["HTTP 503", "answers but fails"]),
])
def test_an_api_that_answers_wrongly_says_what_to_fix(status, words):
    state = readiness()
    _failing(state, Probe(status, f"HTTP Error {status}"), PROBE_ATTEMPTS, PROBE_PATIENCE)
    error = str(error_of(state, now=PROBE_PATIENCE * PROBE_ATTEMPTS))
    assert all(word in error for word in words), error
    assert "localcloud start" not in error   # not a local cloud


def test_the_deadline_is_a_timeout_with_both_logs():
    error = error_of(readiness(timeout=60), now=61.0)
    assert isinstance(error, BootFailed) and "did not come online within 60 s" in str(error)
    assert "worker log tail" in str(error) and "boot log tail" in str(error)


def test_worker_log_tail_drops_traceback_frames():
    log = "start\nTraceback (most recent call last):\n  File \"x.py\", line 1\n" \
          "httpx.ConnectError: All connection attempts failed\n"
    assert worker_log_tail(log) == ("start\nTraceback (most recent call last):\n"
                                    "httpx.ConnectError: All connection attempts failed")


def _probe(url: str) -> Probe | None:
    command = probe_command(sys.executable, url)
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    return parse_probe(out.stdout)


def test_probe_against_a_server_and_a_closed_port():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert _probe(f"http://127.0.0.1:{port}/api") == Probe(200, "")
        assert _probe(f"http://127.0.0.1:{port}/wrong").status == 404
    finally:
        server.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]   # bound, never listening: connections are refused
        refused = _probe(f"http://127.0.0.1:{closed}/api")
    assert refused.status is None and "Connection refused" in refused.error


def test_a_probe_that_cannot_run_is_inconclusive():
    out = subprocess.run(["bash", "-c", probe_command("/nonexistent/python", "http://h/api")],
                         capture_output=True, text=True, timeout=30)
    assert parse_probe(out.stdout) is None
    state = readiness()
    state.record_probe(None, now=0.0)
    assert state.needs_probe and error_of(state, now=PROBE_PATIENCE * 10) is None


@pytest.mark.parametrize("status, log, expected", [
    (None, None, (None, 0)),                                   # booting, no worker yet
    ("failed: exit 127 at line 0 (customenv: failed)", None,   # the worker never started
     ("failed: exit 127 at line 0 (customenv: failed)", 0)),
    ("ready", "started\n", ("ready", 0)),
    ("ready", f"{WORKER_EXIT_LINE} 1; restarting\n" * 2, ("ready", 2)),
])
def test_observation_of_boot_status_and_worker_exits(tmp_path, status, log, expected):
    """observe_command run by bash on a fake home, parsed: every combination of files."""
    home = tmp_path / "home" / "azureuser"
    (home / ".azmanagers").mkdir(parents=True)
    if status is not None:
        (home / ".azmanagers" / "boot.status").write_text(status + "\n")
    if log is not None:
        (home / WORKER_LOG).write_text(log)
    command = observe_command("azureuser").replace("/home/azureuser", str(home))
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=home,
                         timeout=30)
    assert parse_observation(out.stdout) == expected
