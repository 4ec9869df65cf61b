"""`recserve serve` as a real process: start-up health, SIGTERM drain, restart durability,
and the `recserve-health` probe's exit codes."""

from __future__ import annotations

import os
import queue
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest

from recserve.clients.client import RecommenderClient, RecserveError
from recserve.clients.health import check
from recserve.v1 import recommender_pb2 as pb
from recserve.v1 import recommender_pb2_grpc as pb_grpc
from tests.service_helpers import free_port, publish_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models_dir(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    publish_models(small, root)
    return root


class Proc:
    """A `recserve serve` subprocess; stderr is collected for the bound port and logs."""

    def __init__(self, *args: str, cwd: Path | None = None, preexec_fn=None) -> None:
        # A working directory of its own: the default state (var/feedback.sqlite)
        # lands there, never in the source tree or shared between servers.
        self.cwd = cwd or Path(tempfile.mkdtemp(prefix="recserve-proc-"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recserve", "serve", "--host", "127.0.0.1", *args],
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # PYTHONFAULTHANDLER: a server that hangs in stop() is sent SIGABRT,
            # which prints every thread's stack to stderr for the failure message.
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
            preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self.port: queue.Queue[int] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on \S+:(\d+)", line)
            if m:
                self.port.put(int(m.group(1)))

    def target(self) -> str:
        try:
            return f"127.0.0.1:{self.port.get(timeout=60)}"
        except queue.Empty:
            raise AssertionError("server did not start:\n" + "".join(self.lines)) from None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit code; a server still running after `timeout`
        fails the test with every thread's stack and its log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(30)
            time.sleep(0.5)  # the reader thread collects the dump
            raise AssertionError(
                f"server still running {timeout:.0f}s after SIGTERM:\n" + "".join(self.lines[-200:])
            ) from None


def wait_serving(target: str, service: str = "", timeout: float = 30) -> float:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        try:
            if check(target, service, 1.0) == "SERVING":
                return time.monotonic() - t
        except grpc.RpcError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"{service or 'server'} not SERVING after {timeout}s")


def test_sigterm_drains_in_flight_streams_and_feedback_survives_restart(models_dir, tmp_path):
    db = tmp_path / "fb.sqlite"
    args = ["--models", str(models_dir), "--port", "0", "--metrics-port", "0"]
    p = Proc(*args, "--feedback-db", str(db))
    target = p.target()
    wait_serving(target)
    for name in ("popularity", "itemknn", "als", "bayes_mf"):
        wait_serving(target, f"model/{name}")
    with RecommenderClient(target) as rc:
        assert rc.record("501", ["1", "2", "3"]) == (3, 0, 0)
        before = rc.recommend("501", 10, model="als").item_ids

    # An open RecommendBatch stream: requests go in one at a time.
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.RecommenderStub(channel)
    requests: queue.Queue = queue.Queue()

    def feed():
        while (req := requests.get()) is not None:
            yield req

    responses = stub.RecommendBatch(feed(), timeout=30)
    requests.put(pb.RecommendRequest(request_id="1", user_id="7", k=5))
    assert next(responses).request_id == "1"

    p.proc.send_signal(signal.SIGTERM)
    # New calls are refused while the open stream is still answered.
    deadline = time.monotonic() + 10
    refused = None
    while time.monotonic() < deadline:
        try:
            with RecommenderClient(target, deadline=2) as rc:
                rc.recommend("7", 3)
        except Exception as exc:  # RecserveError
            refused = exc
            break
        time.sleep(0.05)
    assert refused is not None and refused.code == "UNAVAILABLE", refused
    requests.put(pb.RecommendRequest(request_id="2", user_id="8", k=5))
    second = next(responses)
    assert second.request_id == "2" and len(second.items) == 5
    requests.put(None)
    assert list(responses) == []
    channel.close()
    assert p.proc.wait(30) == 0
    assert any("draining" in line for line in p.lines)

    # Restart: the recorded events are replayed, recommendations are unchanged.
    p2 = Proc(*args, "--feedback-db", str(db))
    try:
        target = p2.target()
        wait_serving(target, "model/als")
        with RecommenderClient(target) as rc:
            assert rc.recommend("501", 10, model="als").item_ids == before
    finally:
        assert p2.stop() == 0
    assert any("replayed 3 feedback events" in line for line in p2.lines)


def test_health_probe_exit_codes(models_dir):
    p = Proc("--models", str(models_dir), "--port", "0", "--metrics-port", "0")
    try:
        target = p.target()
        probe = [
            sys.executable,
            "-m",
            "recserve.clients.health",
            "--target",
            target,
            "--wait",
            "30",
        ]
        ok = subprocess.run(probe, capture_output=True, text=True, cwd=ROOT)
        assert ok.returncode == 0 and "SERVING" in ok.stdout
        model = subprocess.run(
            [*probe[:-2], "--service", "model/als", "--wait", "30"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert model.returncode == 0
        unknown = subprocess.run(
            [*probe[:-2], "--service", "model/nope"], capture_output=True, text=True, cwd=ROOT
        )
        assert unknown.returncode == 1 and "SERVICE_UNKNOWN" in unknown.stdout
    finally:
        assert p.stop() == 0
    free = free_port()  # held, never listening: nothing answers there
    down = subprocess.run(
        [
            sys.executable,
            "-m",
            "recserve.clients.health",
            "--target",
            f"127.0.0.1:{free}",
            "--timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert down.returncode == 2 and "unreachable" in down.stdout


def test_serve_refuses_a_bad_config_naming_the_key(models_dir, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server]\nmax_k = -3\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "recserve",
            "serve",
            "--config",
            str(cfg),
            "--models",
            str(models_dir),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 2 and "max_k: must be in" in out.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_metrics_port_in_use_is_named_before_grpc_listens(models_dir, workers):
    # It said "[Errno 98] Address already in use" after gRPC was listening,
    # which read as the gRPC port's.
    import socket

    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    metrics = taken.getsockname()[1]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "recserve", "serve", "--models", str(models_dir),
             "--port", "0", "--metrics-port", str(metrics),
             "--workers", workers],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip
    finally:
        taken.close()
    assert out.returncode == 2, out.stderr
    assert f"metrics_port: cannot bind port {metrics}" in out.stderr
    if workers == "1":
        assert "listening on" not in out.stderr  # refused before gRPC took the port


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_address_that_cannot_be_bound_names_the_setting_at_fault(models_dir, tmp_path, workers):
    # gRPC says "Failed to bind" alike for a port in use and a host that is no
    # address of this machine; a models path that is a file read as a broken
    # hybrids.json.
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    a_file = tmp_path / "models.txt"
    a_file.write_text("not a folder")
    cases = [
        (["--host", "192.0.2.1"], "host: '192.0.2.1' is no address this server can listen on"),
        (["--host", "nosuch.invalid"], "host: 'nosuch.invalid' is no address"),
        (["--host", "127.0.0.1", "--port", str(busy)], f"port: cannot bind 127.0.0.1:{busy}"),
        (["--models", str(a_file)], f"models: {a_file} is not a folder"),
    ]
    try:
        for extra, says in cases:
            out = subprocess.run(
                [sys.executable, "-m", "recserve", "serve", "--models", str(models_dir),
                 "--port", "0", "--metrics-port", "0", "--workers", workers, *extra],
                capture_output=True, text=True, cwd=ROOT, timeout=120,
            )  # fmt: skip
            assert out.returncode == 2 and says in out.stderr, (extra, out.stderr[-600:])
    finally:
        taken.close()


def test_a_drain_that_hangs_is_reported_with_its_stacks_and_exits_1():
    """The overrun watchdog: a drain stuck past grace + DRAIN_OVERRUN prints every
    thread's stack and exits 1 instead of waiting for a SIGKILL."""
    script = """
import os, signal, threading, time
import recserve.launch as launch, recserve.service as service
from recserve.config import ServerConfig

class StuckApp:
    def __init__(self, cfg, settle_heap=False): pass
    def start(self): return 1
    def drain(self):
        threading.Event().wait()  # never returns: a hung shutdown

service.App = StuckApp
launch.DRAIN_OVERRUN = 1.0
launch._announce = lambda cfg, port: None
threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
launch.serve(ServerConfig(grace_seconds=0.5, metrics_port=0))
"""
    t = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 1, out.stderr
    assert "Timeout (0:00:01.500000)!" in out.stderr and "in drain" in out.stderr
    assert time.monotonic() - t < 30


def test_a_sigterm_right_after_listening_drains(tmp_path):
    """The handlers were installed after App.start() had logged "listening on":
    a SIGTERM in between (a test stopping a server it had just used, a rolling
    restart) killed the process with -15 instead of draining it (one fresh-clone
    CI run: test_an_acknowledged_event_survives_sigkill). Here the SIGTERM comes
    the moment start() returns, before anything else runs."""
    script = f"""
import logging, os, signal
import recserve.launch as launch, recserve.service as service
from recserve.config import ServerConfig

logging.basicConfig(level=logging.INFO)

class App(service.App):
    def start(self):
        port = super().start()
        os.kill(os.getpid(), signal.SIGTERM)
        return port

service.App = App
launch.serve(ServerConfig(models={str(tmp_path / "none")!r}, port=0, metrics_port=0,
                          state_dir={str(tmp_path)!r}, grace_seconds=0.5))
print("drained", flush=True)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert "listening on" in out.stderr and "signal received: draining" in out.stderr
    assert out.stdout == "drained\n"


def test_sigterm_is_never_lost_to_another_thread():
    """The kernel may deliver SIGTERM to any thread, and CPython runs the handler
    only when the main thread next runs bytecode: a main thread blocked in
    Event.wait lost it (2-7 in 60 with two busy threads; a CI run once saw a
    server ignore SIGTERM for 30 s). 30 processes with two busy threads, each
    SIGTERMed as soon as it waits: every one stops."""
    script = """
import threading
from recserve.launch import _wait_for_signal
def busy():
    while True:
        pass
for _ in range(2):
    threading.Thread(target=busy, daemon=True).start()
print("waiting", flush=True)
_wait_for_signal()
print("stopped", flush=True)
"""
    lost = 0
    for _ in range(30):
        p = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        try:
            assert p.stdout is not None and p.stdout.readline() == "waiting\n"
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)  # a 1 s safety bound in the waiter, so 10 s is lost
            except subprocess.TimeoutExpired:
                lost += 1
        finally:
            p.kill()
            p.wait()
            p.stdout.close()
    assert lost == 0


def test_the_signal_wait_works_past_descriptor_1023():
    # A process embedding the server can hold a thousand descriptors before it
    # waits for signals (a test run holding many mapped bundle files did):
    # select() refuses descriptors numbered 1024 and up, poll does not.
    script = """
import os, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft != resource.RLIM_INFINITY and soft < 1200:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1200, hard), hard))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
import signal
from recserve.launch import Signals, _wait_for_signal
signals = Signals({signal.SIGTERM: None, signal.SIGINT: None})  # before "waiting"
print("waiting", flush=True)
_wait_for_signal(signals)
print("stopped", flush=True)
"""
    p = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == "waiting\n"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0 and out == "stopped\n", err


def test_sighup_reads_the_config_file_again(small, tmp_path):
    # `serve --config FILE`: SIGHUP reads FILE again with the flags given at
    # start (--port 0 stays), so max_k and a new experiment apply at once.
    from recserve.models import create

    root = tmp_path / "models"
    create("popularity").fit(small).save(root, "popularity")
    config = tmp_path / "recserve.toml"
    config.write_text("[server]\nmax_k = 5\nport = 1\n")
    p = Proc("--config", str(config), "--models", str(root), "--port", "0", "--metrics-port", "0")
    try:
        target = p.target()
        wait_serving(target, "model/popularity")
        with RecommenderClient(target) as rc, pytest.raises(RecserveError) as info:
            rc.recommend("7", 8)
        assert info.value.code == "INVALID_ARGUMENT" and info.value.reason == "K_OUT_OF_RANGE"
        config.write_text(
            "[server]\nmax_k = 10\nport = 1\n[experiments.ab]\narms = {popularity = 1}\n"
        )
        p.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not any("SIGHUP: reloaded ab; refused nothing" in x for x in p.lines):
            assert time.monotonic() < deadline, "".join(p.lines)
            time.sleep(0.1)
        with RecommenderClient(target) as rc:
            assert len(rc.recommend("7", 8).items) == 8
            assert rc.recommend("7", 3, model="ab").arm == "popularity"
        assert not any("restart to apply" in x for x in p.lines)
    finally:
        assert p.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_closing_its_terminal_stops_the_server_and_kill_hup_reloads_it(small, tmp_path, workers):
    # A server run in a terminal (`make serve`) gets SIGHUP when the terminal
    # closes. With SIGHUP meaning reload, it went on running without one,
    # holding its ports, so the next `make serve` could not bind. A SIGHUP while
    # the terminal is open is still a reload.
    import pty

    from recserve.models import create

    root = tmp_path / "models"
    create("popularity").fit(small).save(root, "popularity")
    args = ["--host", "127.0.0.1", "--models", str(root), "--port", "0", "--metrics-port", "0"]
    args += ["--workers", str(workers), "--state-dir", str(tmp_path / "var")]
    pid, fd = pty.fork()  # the child's controlling terminal is this pty
    if pid == 0:
        try:
            os.execv(sys.executable, [sys.executable, "-m", "recserve", "serve", *args])
        finally:
            os._exit(127)
    out = b""
    poll = select.poll()
    poll.register(fd, select.POLLIN)

    def read_until(text: bytes) -> None:
        nonlocal out
        deadline = time.monotonic() + 30
        while text not in out:
            assert time.monotonic() < deadline, out.decode(errors="replace")
            if poll.poll(500):  # poll, not select: the suite's process may hold fds > 1023
                out += os.read(fd, 65536)

    try:
        read_until(b"listening on")
        if workers > 1:
            read_until(b"worker 1 (pid")
        os.kill(pid, signal.SIGHUP)
        read_until(b"SIGHUP: reloaded ")
        os.close(fd)  # the terminal closes: the kernel hangs it up and sends SIGHUP
        fd = -1
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            assert time.monotonic() < deadline, "still serving after its terminal closed"
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(done[1]) == 0
        pid = 0
    finally:
        if fd >= 0:
            os.close(fd)
        if pid:  # the whole session: no worker may outlive a failed test
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_sighup_reloads_newly_published_versions(small, tmp_path):
    # `kill -HUP` is a server's conventional reload: the same switch as
    # Admin.ReloadModels, with a version that fails verification refused and
    # the serving one kept.
    from recserve.models import create
    from tests.service_helpers import flip_byte

    root = tmp_path / "models"
    pop = create("popularity").fit(small)
    first = pop.save(root, "popularity").name
    p = Proc("--models", str(root), "--port", "0", "--metrics-port", "0")
    try:
        target = p.target()
        wait_serving(target, "model/popularity")

        def serving() -> str:
            with RecommenderClient(target) as rc:
                return rc.recommend("7", 3, model="popularity").version

        assert serving() == first
        second = pop.save(root, "popularity").name
        p.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while serving() != second:
            assert time.monotonic() < deadline, "".join(p.lines)
            time.sleep(0.1)
        bad = pop.save(root, "popularity")
        flip_byte(next(f for f in bad.iterdir() if f.suffix == ".npy"))
        p.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not any("SIGHUP: reloaded nothing; refused popularity" in x for x in p.lines):
            assert time.monotonic() < deadline, "".join(p.lines)
            time.sleep(0.1)
        assert serving() == second
    finally:
        assert p.stop() == 0
