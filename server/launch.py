"""`recserve serve`: one process, or N worker processes sharing the port.

With `workers > 1` the launcher forks N workers before any gRPC object exists
(gRPC must not be running across a fork). Each worker runs a full App bound to
the same port with SO_REUSEPORT (the kernel spreads connections over them),
maps the same bundle files (page cache shared, so memory does not grow
N-fold), and caps BLAS/OpenMP pools to its share of the cores (threadpoolctl)
so the workers do not oversubscribe. Prometheus runs in multi-process mode:
the launcher sets PROMETHEUS_MULTIPROC_DIR before prometheus_client is
imported anywhere and serves /metrics aggregated over the workers. SIGTERM to
the launcher is passed on to every worker, each drains, the launcher exits 0.
SIGHUP (to the launcher, or from a worker whose Admin.ReloadModels ran) is passed
on too: every worker reloads.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import logging
import os
import resource
import select
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from recserve.config import ServerConfig, bind_failure

log = logging.getLogger("recserve")

# Seconds past the drain's grace after which a stopping server gives up: it
# prints every thread's stack to stderr and exits 1 (faulthandler's watchdog,
# which runs even if Python threads are stuck), so a hung shutdown is reported
# with its cause instead of waiting for an orchestrator's SIGKILL.
DRAIN_OVERRUN = 15.0


def _drain(app, cfg: ServerConfig) -> None:
    """Drain under the overrun watchdog (see DRAIN_OVERRUN)."""
    faulthandler.dump_traceback_later(cfg.grace_seconds + DRAIN_OVERRUN, exit=True)
    app.drain()


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _announce(cfg: ServerConfig, port: int) -> None:
    host = "localhost" if cfg.host in ("[::]", "0.0.0.0") else cfg.host
    log.info(
        'try: grpcurl -plaintext -d \'{"user_id": "1", "k": 5}\' %s:%d '
        "recserve.v1.Recommender/Recommend",
        host,
        port,
    )
    log.info("  or: python -m recserve.clients --target %s:%d recommend --user 1 --k 5", host, port)
    if cfg.metrics_port:
        log.info("metrics: http://%s:%d/metrics", host, cfg.metrics_port)


class Signals:
    """Signals for the main thread, on whichever thread the kernel delivers them.

    CPython runs a signal's Python handler only when the main thread next runs
    bytecode, and the kernel may deliver a signal sent to the process to any
    of its threads. A main thread blocked in a lock wait (`Event.wait`) or in
    `waitpid` is then never woken, and the SIGTERM is lost: 7 of 60 in a
    process with two busy threads (a server whose models are loading), and a
    CI run once saw a server ignore its SIGTERM for 30 s. So the handlers only
    note the signal, and the main thread waits on the wakeup socket that
    CPython's C-level handler writes to from any thread."""

    def __init__(self, handlers: dict[int, Callable[[int], None] | None]) -> None:
        self.got: list[int] = []
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        for sig, then in handlers.items():
            signal.signal(sig, self._handler(then))

    def _handler(self, then: Callable[[int], None] | None) -> Callable:
        def handle(signum: int, _frame: object) -> None:
            self.got.append(signum)
            if then is not None:
                then(signum)

        return handle

    def wait(self, timeout: float) -> None:
        """Until a signal has arrived (its handler then runs on return), or
        `timeout` seconds (a bound, should a wakeup byte ever be dropped)."""
        # poll, not select: select refuses descriptors numbered 1024 and up, which
        # a process embedding the server (a test run holding many mapped files)
        # reaches.
        poll = select.poll()
        poll.register(self._r, select.POLLIN)
        poll.poll(timeout * 1000)
        with contextlib.suppress(BlockingIOError):
            self._r.recv(4096)


class Terminal:
    """The controlling terminal this process started on, if any. SIGHUP means
    two things: an operator's reload (`kill -HUP`), and the terminal's hangup
    (its window closed, its ssh session dropped), which stops a program run in
    the foreground. The second leaves the terminal hung up, which a descriptor
    opened on it at start shows (poll reports POLLHUP); without a terminal (a
    service, a container) every SIGHUP is a reload."""

    def __init__(self) -> None:
        try:
            self._fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            self._fd = -1

    def hung_up(self) -> bool:
        """Whether the terminal this process started on has hung up since."""
        if self._fd < 0:
            return False
        poll = select.poll()
        poll.register(self._fd, 0)  # POLLHUP, POLLERR and POLLNVAL are always reported
        return bool(poll.poll(0))


def _wait_for_signal(
    signals: Signals | None = None, app: Any = None, terminal: Terminal | None = None
) -> None:
    """Block the main thread until SIGTERM or SIGINT (noted by `signals`, or by
    handlers installed now), or a SIGHUP from `terminal` hanging up; each other
    SIGHUP meanwhile reloads `app`."""
    signals = signals or Signals({signal.SIGTERM: None, signal.SIGINT: None})
    reloads = 0  # SIGHUPs handled: a count, as the handler only ever appends
    while True:
        if any(s != signal.SIGHUP for s in signals.got):
            return
        hups = signals.got.count(signal.SIGHUP)
        if hups > reloads and terminal is not None and terminal.hung_up():
            log.info("SIGHUP: the terminal closed")
            return
        if hups > reloads and app is not None:
            reloads = hups
            _reload(app)
            continue
        signals.wait(1.0)


def _reload(app: Any) -> None:
    """SIGHUP: switch to newly published versions and read the config again, as
    Admin.ReloadModels does."""
    try:
        switched, refused, virtual, config_error = app.core.reload_models()
    except Exception:  # a reload must never take the server down
        log.exception("SIGHUP: reload failed")
        return
    log.info(
        "SIGHUP: reloaded %s; refused %s",
        ", ".join([f"{s.name}@{s.version}" for s in switched] + [v.name for v in virtual])
        or "nothing",
        ", ".join(
            [f"{s.name} ({s.error})" for s in refused]
            + ([f"the config ({config_error})"] if config_error else [])
        )
        or "nothing",
    )


# Below this many descriptors a busy server runs short: each client connection
# holds one, and each mapped bundle file one more (a model has 5-15).
FEW_OPEN_FILES = 4096


def more_open_files() -> int:
    """Raise this process's soft limit on open descriptors to its hard limit, as
    Go and the JVM do at start; returns the limit now in force. Many systems
    still set the soft limit to 1,024, and a server past it can no longer
    accept connections (gRPC logs EMFILE and its clients wait) nor map a
    model's files on reload. Workers inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = hard
    if hard == resource.RLIM_INFINITY:  # the kernel refuses more than fs.nr_open
        try:
            top = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            top = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < top:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
            log.info("open files: soft limit raised from %d to %d", soft, top)
            soft = top
        except (ValueError, OSError) as exc:
            log.warning("open files: could not raise the soft limit %d: %s", soft, exc)
    if soft != resource.RLIM_INFINITY and soft < FEW_OPEN_FILES:
        log.warning(
            "open files: the limit is %d; each client connection and each mapped model "
            "file holds one, so a busy server may run out (raise it: ulimit -n, or "
            "LimitNOFILE= in a systemd unit)",
            soft,
        )
    return soft


def serve(cfg: ServerConfig) -> None:
    """Serve until SIGTERM/SIGINT, then drain; workers > 1 forks worker processes."""
    more_open_files()
    if cfg.workers > 1:
        serve_workers(cfg)
        return
    from threadpoolctl import threadpool_limits

    from recserve.service import App

    # One request's BLAS/OpenMP work runs on kernel_threads threads: the thread
    # pool already spreads concurrent requests over the cores, and waking a
    # BLAS team per request costs more than it saves (measured with
    # `recserve bench`: server CPU per Recommend falls by ~0.5 ms on 2 cores).
    threadpool_limits(limits=cfg.kernel_threads or cores())
    # Before the server starts: from "listening on" on, a SIGTERM (a rolling
    # restart, a test's stop) must drain, and with the handlers installed only
    # after start it killed the process outright (-15) when it came first.
    signals = Signals({signal.SIGTERM: None, signal.SIGINT: None, signal.SIGHUP: None})
    terminal = Terminal()
    app = App(cfg, settle_heap=True)
    port = app.start()
    _announce(cfg, port)
    _wait_for_signal(signals, app, terminal)
    log.info("signal received: draining (grace %.1fs)", cfg.grace_seconds)
    _drain(app, cfg)


def _reserve_port(cfg: ServerConfig) -> tuple[socket.socket, int]:
    """A bound (not listening) SO_REUSEPORT socket holding the port for the workers."""
    host = "::" if cfg.host in ("[::]", "::") else cfg.host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, cfg.port))
    except OSError as exc:
        sock.close()
        raise OSError(bind_failure(cfg.host, f"{cfg.host}:{cfg.port}", str(exc))) from None
    return sock, sock.getsockname()[1]


def _stop_with(launcher: int) -> None:
    """Have the kernel send this worker SIGTERM when its launcher dies (Linux's
    PR_SET_PDEATHSIG), so a launcher killed outright (SIGKILL, the OOM killer)
    does not leave its workers serving, and holding the port, as orphans."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: orphans as before
        return
    if os.getppid() != launcher:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(
    cfg: ServerConfig, index: int, signals: Signals, launcher: int, terminal: Terminal
) -> int:
    """Body of one forked worker process; returns its exit code. `signals`: its
    own, installed the moment it was forked (a SIGTERM while it starts drains it
    once started; a SIGHUP reloads once started)."""
    from threadpoolctl import threadpool_limits

    from recserve.service import App

    share = max(1, cores() // cfg.workers)
    if cfg.kernel_threads:
        share = min(share, cfg.kernel_threads)
    threadpool_limits(limits=share)
    app = App(cfg, settle_heap=True)

    def reload_siblings() -> None:
        # ReloadModels reached this worker only: the launcher passes SIGHUP on to
        # every worker (this one's second reload finds nothing new). Never to a
        # process that is no longer our launcher (an orphan's parent is init).
        if os.getppid() == launcher:
            os.kill(launcher, signal.SIGHUP)

    app.core.after_reload = reload_siblings
    app.start()
    log.info("worker %d (pid %d) serving, %d BLAS/OpenMP thread(s)", index, os.getpid(), share)
    _wait_for_signal(signals, app, terminal)
    _drain(app, cfg)
    return 0


def serve_workers(cfg: ServerConfig) -> None:
    """Fork cfg.workers workers on one port; aggregate their metrics; pass signals on."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("workers: prometheus_client was imported before the launcher ran")
    metrics_dir = tempfile.mkdtemp(prefix="recserve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    holder, port = _reserve_port(cfg)
    worker_cfg = replace(cfg, port=port, metrics_port=0)
    pids: list[int] = []
    stopping: list[bool] = []
    launcher = os.getpid()

    def to_workers(sig: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def forward(_signum: int) -> None:
        stopping.append(True)
        to_workers(signal.SIGTERM)

    # Installed before the first fork: a SIGTERM at any moment from here on is
    # passed on to the workers. Installed after "listening on" (and the metrics
    # server's start), one arriving first killed the launcher and left the
    # workers running. SIGCHLD only wakes the loop below, which reaps without
    # blocking (a blocking waitpid would not wake for a signal another thread
    # received).
    terminal = Terminal()

    def reload_all(_signum: int) -> None:  # SIGHUP: an operator, a worker, or a hangup
        if terminal.hung_up():
            log.info("SIGHUP: the terminal closed")
            forward(signal.SIGTERM)
        else:
            to_workers(signal.SIGHUP)

    signals = Signals(
        {
            signal.SIGTERM: forward,
            signal.SIGINT: forward,
            signal.SIGHUP: reload_all,
            signal.SIGCHLD: None,
        }
    )
    held = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    for i in range(cfg.workers):
        if stopping:  # told to stop while starting: fork no more
            break
        # Blocked across the fork: a signal arriving meanwhile waits for the
        # child's own handlers (the launcher's would forward it to the
        # siblings from inside the child) or, in the launcher, for the pid to
        # be on the list it forwards to.
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                own = Signals({signal.SIGTERM: None, signal.SIGINT: None, signal.SIGHUP: None})
                signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
                holder.close()
                _stop_with(launcher)
                code = _worker(worker_cfg, i, own, launcher, terminal)
            except BaseException:
                log.exception("worker %d failed", i)
            finally:
                logging.shutdown()
                os._exit(code)
        pids.append(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    holder.close()  # the workers' listening sockets hold the port now
    log.info("listening on %s:%d (%d workers: %s)", cfg.host, port, len(pids), pids)

    from prometheus_client import CollectorRegistry, multiprocess

    from recserve.metrics import serve_http

    http = None
    if cfg.metrics_port:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        http = serve_http(cfg.metrics_port, registry)
    _announce(cfg, port)
    failed = 0
    alive = set(pids)
    while alive:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            signals.wait(1.0)
            continue
        if pid not in alive:
            continue
        alive.discard(pid)
        multiprocess.mark_process_dead(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            failed += 1
            log.error("worker pid %d exited with %d", pid, code)
        if not stopping:
            log.error("worker pid %d stopped unexpectedly; stopping the others", pid)
            forward(signal.SIGTERM)
    if http is not None:
        http[0].shutdown()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("all workers stopped")
    if failed:
        raise SystemExit(1)
