"""llama.cpp built once from the source vendored in the pinned llama-cpp-python sdist, into a cache directory
(SPEC §11: the CPU yardstick), for the side-by-side benchmark (benchmarks/llama_cpp_compare.py).

    python -m deepseek_lm.bench.llama_cpp     # build (or find) it; prints the directory of its binaries

The sdist comes from PyPI through pip (`pip download --no-binary :all:`); the build is CPU only, with the
native instruction set (what llama.cpp's own releases for a machine do), and without anything that reaches
the network at run time (curl, OpenSSL, the prebuilt web UI): the flags of ANCHORS.md. About 11 CPU-minutes;
a second call finds the binaries and returns at once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; it vendors llama.cpp 0.5.0-dev
TARGETS = ("llama-bench", "llama-server", "llama-cli", "llama-tokenize")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
)


def default_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "deepseek-lm" / "llama.cpp" / VERSION


def binaries(cache: Path) -> Path:
    return cache / "build" / "bin"


def source(cache: Path) -> Path:
    """The vendored llama.cpp tree (its converter and gguf-py live there too)."""
    return cache / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def ensure_built(cache: Path | None = None, jobs: int | None = None, log=print) -> Path:
    """The directory of llama-bench, llama-server, ...: built on the first call, found on the next."""
    cache = cache or default_cache()
    bin_dir = binaries(cache)
    if all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    src = _unpacked_source(cache, log)
    build = cache / "build"
    jobs = jobs or os.cpu_count() or 1
    log(f"building llama.cpp {VERSION} (CPU) in {build}: about 11 CPU-minutes, once")
    _run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS])
    _run(["cmake", "--build", str(build), f"-j{jobs}", "--target", *TARGETS])
    return bin_dir


def _unpacked_source(cache: Path, log) -> Path:
    src = source(cache)
    if (src / "CMakeLists.txt").exists():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        log(f"downloading the llama-cpp-python {VERSION} sdist from PyPI")
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        _run([*pip, f"llama-cpp-python=={VERSION}", "-d", str(cache)])
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, filter="data")
    return src


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed (exit {result.returncode}):\n{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None, help=f"default: {default_cache()}")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    args = parser.parse_args()
    print(ensure_built(args.cache, args.jobs))


if __name__ == "__main__":
    main()
