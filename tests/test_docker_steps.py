"""The Dockerfile's steps, run here as commands (no Docker engine on these machines):
build the wheel, install it alone in a fresh venv, check that it installs exactly
one top-level import package (`recserve`) and the two console scripts, run the
image's default command (quickstart, then serve) and pass the image's
HEALTHCHECK (`recserve-health`).

Slow (a wheel build and a fresh install: a few minutes); the installs come
from the package registry or pip's cache. Prints the installed size and the
idle resident memory for the closing note.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.service_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def test_wheel_installs_alone_and_serves_the_default(tmp_path):
    if os.environ.get("RECSERVE_TEST_SKIP_DOCKER_STEPS"):
        pytest.skip("RECSERVE_TEST_SKIP_DOCKER_STEPS is set")
    wheels = tmp_path / "wheels"
    # Builder stage: `pip wheel --no-deps .` (build deps from this venv, as the
    # builder stage has them installed).
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        cwd=ROOT,
        timeout=1200,
    )
    (wheel,) = wheels.glob("recserve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n for n in names if n.endswith(".dist-info/RECORD")).rsplit("/", 1)[0]
        entry = configparser.ConfigParser()
        entry.read_string(zf.read(f"{info}/entry_points.txt").decode())
        top_level = zf.read(f"{info}/top_level.txt").decode().split()
    # One import name: every file of the wheel but its metadata is under recserve/.
    assert top_level == ["recserve"], top_level
    roots = {n.split("/", 1)[0] for n in names if not n.startswith(info)}
    assert roots == {"recserve"}, roots
    assert "recserve/v1/recommender_pb2.py" in names and "recserve/kernels/topk.pxd" in names
    assert any(re.fullmatch(r"recserve/kernels/topk\.cpython-.*\.so", n) for n in names)
    assert dict(entry["console_scripts"]) == {
        "recserve": "recserve.cli:main",
        "recserve-health": "recserve.clients.health:main",
    }
    # Runtime stage: a fresh environment with the wheel and its dependencies only.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_ = venv / "bin"
    subprocess.run(
        [str(bin_ / "python"), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        timeout=1800,
    )
    site = next((venv / "lib").glob("python3*/site-packages"))
    ours = du(site / "recserve")
    for generic in ("server", "kernels", "clients"):  # the names 0.1 put in site-packages
        assert not (site / generic).exists(), generic
    total = du(site)
    # No build tools in the runtime: Cython and grpcio-tools are build-time only.
    assert not (site / "Cython").exists() and not (site / "grpc_tools").exists()
    work = tmp_path / "work"
    env = {
        **os.environ,
        "RECSERVE_PORT": str(free_port()),
        "RECSERVE_METRICS_PORT": str(free_port()),
        "RECSERVE_GRACE_SECONDS": "8",
    }
    env.pop("PYTHONPATH", None)
    run_dir = tmp_path / "cwd"  # not the source tree: only the installed wheel is importable
    run_dir.mkdir()
    version = subprocess.run(
        [str(bin_ / "python"), "-m", "recserve", "--version"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.returncode == 0 and version.stdout.startswith("recserve "), version
    subprocess.run(
        [str(bin_ / "recserve"), "quickstart", "--workdir", str(work)],
        check=True,
        cwd=run_dir,
        env=env,
        timeout=900,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = subprocess.Popen(
        [str(bin_ / "recserve"), "serve", "--config", str(work / "recserve.toml")],
        cwd=run_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        probe = subprocess.run(
            [str(bin_ / "recserve-health"), "--wait", "60"],
            cwd=run_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert probe.returncode == 0, probe.stdout + probe.stderr
        status = Path(f"/proc/{server.pid}/status")
        rss = (
            int(re.search(r"VmRSS:\s+(\d+) kB", status.read_text())[1]) * 1024
            if (status.exists())
            else 0
        )
        print(
            f"\ninstalled: recserve {ours / 1e6:.1f} MB, with dependencies "
            f"{total / 1e6:.0f} MB; idle RSS with the default models {rss / 1e6:.0f} MB"
        )
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    shutil.rmtree(venv, ignore_errors=True)
