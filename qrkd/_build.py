"""Builds the extension on first use, when no prebuilt qrkd._C loads with the running torch: after a `pip install`
whose isolated build had no torch (so nothing was compiled), or under a torch other than the one qrkd._C was built for.

The C++ sources ship inside the package (qrkd/csrc; in a checkout or an editable install, csrc/ beside the package).
The build goes to a per-user cache with one folder per torch version, CUDA version (or cpu), Python ABI and hash of
the sources and flags (with -march=native, also of the CPU's instruction-set flags), so a later process loads the
library from there without building and without a compiler. A file lock keeps concurrent processes (torchrun ranks,
test workers) from building one folder twice: a process that finds the lock taken waits, then loads the result.

Environment: QRKD_JIT=0 turns the build off (a missing extension then stays missing); QRKD_CACHE_DIR replaces the cache
root ($XDG_CACHE_HOME/qrkd, else ~/.cache/qrkd); QRKD_NO_CUDA=1 leaves the CUDA sources out (they are built only when
torch sees a GPU and a CUDA toolkit is found); QRKD_PORTABLE=1 leaves out -march=native.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig

import torch

NAME = "qrkd_C"  # module name of the cached build: its init function is PyInit_qrkd_C
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_SOURCE_SUFFIXES = (".h", ".cpp", ".cu")
_CUDA_FLAGS = ["-O3", "--use_fast_math", "-std=c++17", "-DWITH_CUDA"]  # as setup.py


class ExtensionUnavailable(RuntimeError):
    """The extension can neither be loaded nor built here; the message says why and what to do."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def source_dir() -> str | None:
    """qrkd/csrc in an installed package, else csrc/ beside the package (a checkout or an editable install)."""
    for candidate in (os.path.join(_PACKAGE, "csrc"), os.path.join(os.path.dirname(_PACKAGE), "csrc")):
        if os.path.isfile(os.path.join(candidate, "extension.cpp")):
            return candidate
    return None


def source_files(root: str) -> list:
    """Paths of the C++/CUDA sources and headers under root, relative to it, sorted."""
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.relpath(os.path.join(folder, n), root) for n in names if n.endswith(_SOURCE_SUFFIXES)]
    return sorted(found)


def cache_root() -> str:
    if os.environ.get("QRKD_CACHE_DIR"):
        return os.path.abspath(os.path.expanduser(os.environ["QRKD_CACHE_DIR"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qrkd")


def _cpu_flags() -> str:
    """The CPU's instruction-set flags: a -march=native build is only reused on a CPU that has the same."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _build_config(root: str, files: list):
    with_cuda = (
        not _flag("QRKD_NO_CUDA")
        and any(f.endswith(".cu") for f in files)
        and torch.version.cuda is not None
        and torch.cuda.is_available()
    )
    if with_cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        with_cuda = CUDA_HOME is not None
    native = not _flag("QRKD_PORTABLE")
    cflags = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"] + (["-march=native"] if native else [])  # as setup.py
    cflags += [f"-DQRKD_CPU_KERNELS={'native' if native else 'portable'}"]
    cflags += ["-DWITH_CUDA"] if with_cuda else []
    digest = hashlib.sha256()
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            digest.update(rel.encode() + b"\0" + f.read() + b"\0")
    digest.update(repr((cflags, _CUDA_FLAGS if with_cuda else None)).encode())
    if "-march=native" in cflags:
        digest.update(_cpu_flags().encode())
    abi = sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag
    variant = f"cu{torch.version.cuda}" if with_cuda else "cpu"
    folder = os.path.join(cache_root(), f"torch{torch.__version__}-{variant}-{abi}-{digest.hexdigest()[:16]}")
    return folder, with_cuda, cflags


def _import(library: str, folder: str):
    spec = importlib.util.spec_from_file_location(NAME, library)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise ExtensionUnavailable(f"the cached build {library} does not load ({exc}); delete {folder} to rebuild")
    return module


def load():
    """(module, folder): the extension from the cache, built into it first when it is not there yet.

    Raises ExtensionUnavailable when it cannot be built here (no sources, QRKD_JIT=0, no compiler or ninja, a failed
    build); the message names the cause and the remedy.
    """
    root = source_dir()
    if root is None:
        missing = os.path.join(_PACKAGE, "csrc")
        raise ExtensionUnavailable(f"no C++ sources in {missing} to build it from: reinstall qrkd")
    files = source_files(root)
    folder, with_cuda, cflags = _build_config(root, files)
    library = os.path.join(folder, NAME + ".so")
    done, failed = os.path.join(folder, "built"), os.path.join(folder, "failed.log")
    if os.path.exists(done):
        return _import(library, folder), folder
    if os.environ.get("QRKD_JIT", "").strip() == "0":
        raise ExtensionUnavailable(
            "QRKD_JIT=0 turns off building it on first use: unset QRKD_JIT, or install a qrkd wheel built for torch "
            f"{torch.__version__}"
        )
    if not os.path.exists(failed):
        _check_tools()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise ExtensionUnavailable(f"cannot create the build cache {folder} ({exc}): set QRKD_CACHE_DIR to a writable "
                                   "folder")
    with _locked(os.path.join(folder, "qrkd.lock"), folder):
        if os.path.exists(failed):
            raise ExtensionUnavailable(f"building it failed (log: {failed}); delete {folder} to retry")
        if not os.path.exists(done):
            _compile(root, files, folder, with_cuda, cflags)
    return _import(library, folder), folder


def _check_tools() -> None:
    compiler = os.environ.get("CXX", "").strip() or "c++"
    if shutil.which(compiler.split()[0]) is None:
        raise ExtensionUnavailable(
            f"no C++ compiler to build it on first use ({compiler!r} is not on PATH): install one (e.g. `apt install "
            f"g++`; CXX names another) or a qrkd wheel built for torch {torch.__version__}"
        )
    if _ninja_dir() is None:
        raise ExtensionUnavailable("ninja is missing, needed to build it on first use: `pip install ninja`")


def _ninja_dir() -> str | None:
    found = shutil.which("ninja")
    if found:
        return os.path.dirname(found)
    # the `ninja` package's executable sits in the environment's bin/, which is not on PATH when the environment's
    # python is run without activating it
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        if os.path.isfile(os.path.join(folder, "ninja")):
            return folder
    return None


@contextlib.contextmanager
def _locked(path: str, folder: str):
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"qrkd: waiting for another process that is building the C++ extension in {folder}",
                  file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _compile(root: str, files: list, folder: str, with_cuda: bool, cflags: list) -> None:
    from torch.utils import cpp_extension

    kernels = "CPU + CUDA" if with_cuda else "CPU"
    print(f"qrkd: building the C++ extension ({kernels} kernels) for torch {torch.__version__} in {folder}: once, "
          "a few minutes (QRKD_JIT=0 turns this off)", file=sys.stderr, flush=True)
    baton = os.path.join(folder, "lock")  # torch's own lock file, left behind by an interrupted build
    if os.path.exists(baton):
        os.remove(baton)
    sources = [os.path.join(root, f) for f in files if f.endswith(".cpp") or (with_cuda and f.endswith(".cu"))]
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = _ninja_dir() + os.pathsep + path
    try:
        cpp_extension.load(
            name=NAME,
            sources=sources,
            extra_cflags=cflags,
            extra_cuda_cflags=_CUDA_FLAGS,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[root],
            build_directory=folder,
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # a compile error: keep the log, and let later processes skip the doomed rebuild
        log = os.path.join(folder, "failed.log")
        with open(log, "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n")
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        first = next((line.strip() for line in lines if "error:" in line), lines[0])
        raise ExtensionUnavailable(f"building it failed ({first}; log: {log}); delete {folder} to retry") from exc
    finally:
        os.environ["PATH"] = path
    with open(os.path.join(folder, "built.tmp"), "w") as f:
        f.write(f"torch {torch.__version__}\n{' '.join(cflags)}\n")
    os.replace(os.path.join(folder, "built.tmp"), os.path.join(folder, "built"))
