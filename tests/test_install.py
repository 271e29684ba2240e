"""Installing qrkd as a user does: `pip install <checkout>` into a fresh environment that has torch (the extension is
built on first use, once, and later processes load it), and the portable binary wheel, which runs with no compiler.

The `install` tests work in fresh virtual environments in a temporary folder. Their torch is this environment's,
through a folder of links named in a .pth file that leaves out qrkd, ninja and the packaging tools, so nothing large is
downloaded: pip's isolated build fetches setuptools and wheel, the install fetches ninja. Each of the two builds of the
extension (first use, wheel) is CPU-only and happens once.
"""

import importlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from qrkd import _build
from qrkd.backends import cpp

ROOT = Path(__file__).resolve().parents[1]
BUILDING = "qrkd: building the C++ extension"
EVEX_ONLY = r"%zmm|%k[0-7]|%[xy]mm(1[6-9]|2[0-9]|3[01])\b"  # registers that only AVX-512 code uses

# a cpp-backend loss and its gradient against the pure-torch backend; prints the cpp backend's status
CHECK = """
import torch, qrkd
from qrkd import backends
torch.manual_seed(0)
student = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
teacher = torch.randn(20, 7, dtype=torch.float64)
twin = student.detach().clone().requires_grad_(True)
loss = qrkd.rkd_angle_loss(student, teacher, backend="cpp") + qrkd.rkd_distance_loss(student, teacher, backend="cpp")
expected = qrkd.rkd_angle_loss(twin, teacher, backend="torch") + qrkd.rkd_distance_loss(twin, teacher, backend="torch")
loss.backward()
expected.backward()
torch.testing.assert_close(loss, expected)
torch.testing.assert_close(student.grad, twin.grad)
print("cpp:", backends.backend_status()["cpp"][1])
"""

# every loss of the cpp backend, its value and gradient, against the reference, float64 and float32, at sizes that run
# the kernels' tiled and vectorised loops; prints the cpp backend's status
PARITY = """
import torch, qrkd
from qrkd import backends
tolerances = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=1e-6)}
g = torch.Generator().manual_seed(0)
cases = [(qrkd.rkd_distance_loss, 150), (qrkd.rkd_angle_loss, 150), (qrkd.fidelity_kernel_loss, 150)]
for dtype, tol in tolerances.items():
    for loss, n in cases:
        s, t = torch.randn(n, 6, generator=g, dtype=dtype), torch.randn(n, 9, generator=g, dtype=dtype)
        values, grads = [], []
        for backend in ("cpp", "reference"):
            x = s.clone().requires_grad_(True)
            value = loss(x, t, backend=backend)
            value.backward()
            values.append(value.detach())
            grads.append(x.grad)
        torch.testing.assert_close(values[0], values[1], **tol)
        torch.testing.assert_close(grads[0], grads[1], **tol)
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    P = torch.randn(40, 3, 6, generator=g, dtype=cdtype) / 3
    results = []
    for backend in ("cpp", "reference"):
        x = P.clone().requires_grad_(True)
        K = qrkd.photonic_fidelity(x, backend=backend)
        (K * torch.arange(K.numel(), dtype=K.dtype).reshape(K.shape)).sum().backward()
        results.append((K.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], **tol)
    torch.testing.assert_close(results[0][1], results[1][1], **tol)
print("cpp:", backends.backend_status()["cpp"][1])
"""


# ----------------------------------------------------------------------------------------- the build cache, in process


def test_cache_root_honours_qrkd_cache_dir_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("QRKD_CACHE_DIR", raising=False)
    assert _build.cache_root() == str(tmp_path / "home" / ".cache" / "qrkd")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _build.cache_root() == str(tmp_path / "xdg" / "qrkd")
    monkeypatch.setenv("QRKD_CACHE_DIR", str(tmp_path / "mine"))
    assert _build.cache_root() == str(tmp_path / "mine")


def test_cache_folder_is_keyed_by_torch_abi_and_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("QRKD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("QRKD_NO_CUDA", "1")
    sources = tmp_path / "csrc"
    shutil.copytree(_build.source_dir(), sources)
    files = _build.source_files(str(sources))
    assert "extension.cpp" in files and any(f.endswith(".h") for f in files)
    folder, with_cuda, cflags = _build._build_config(str(sources), files)
    name = os.path.basename(folder)
    assert not with_cuda and "-DWITH_CUDA" not in cflags
    assert name.startswith(f"torch{torch.__version__}-cpu-{sysconfig.get_config_var('SOABI')}-")
    assert os.path.dirname(folder) == str(tmp_path / "cache")
    assert _build._build_config(str(sources), files)[0] == folder
    (sources / "common.h").write_text((sources / "common.h").read_text() + "\n// changed\n")
    assert _build._build_config(str(sources), files)[0] != folder
    monkeypatch.setenv("QRKD_PORTABLE", "1")
    assert "-march=native" not in _build._build_config(str(sources), files)[2]


def test_the_cpu_kernel_level_is_the_highest_installed_one_the_cpu_runs_or_the_one_asked_for():
    everything = list(cpp.CPU_LEVELS)
    assert cpp.choose_cpu_level(everything, ["x86_64", "x86_64_v3"]) == "x86_64_v3"
    assert cpp.choose_cpu_level(everything, everything) == "x86_64_v4"
    assert cpp.choose_cpu_level(["x86_64", "x86_64_v4"], ["x86_64", "x86_64_v3"]) == "x86_64"
    assert cpp.choose_cpu_level(everything, everything, requested="x86_64") == "x86_64"
    with pytest.raises(ImportError, match="this CPU does not run that instruction set"):
        cpp.choose_cpu_level(everything, ["x86_64", "x86_64_v3"], requested="x86_64_v4")
    with pytest.raises(ImportError, match="QRKD_CPU_ISA=avx9 names no installed CPU kernel module"):
        cpp.choose_cpu_level(everything, everything, requested="avx9")
    with pytest.raises(ImportError, match="no installed CPU kernel module runs on this CPU"):
        cpp.choose_cpu_level(["x86_64_v4"], ["x86_64", "x86_64_v3"])


def test_ninja_of_an_environment_that_is_not_activated_is_found(monkeypatch, tmp_path):
    if not os.path.isfile(os.path.join(sysconfig.get_path("scripts"), "ninja")):
        pytest.fail(f"this environment has no ninja in {sysconfig.get_path('scripts')}: `pip install ninja`")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _build._ninja_dir() == sysconfig.get_path("scripts")


# ------------------------------------------------------------------------------------------ fresh virtual environments


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("QRKD_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CC", "CXX",
                                                      "FORCE_CUDA")}
    env["QRKD_NO_CUDA"] = "1"  # CPU-only builds: the CUDA compile is CI's in-place build
    env.update(extra)
    return env


def _run(args, env, cwd, check=True):
    """Runs args in cwd (never the checkout: `python -c` would import its qrkd)."""
    done = subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    if check and done.returncode != 0:
        command = " ".join(map(str, args))
        pytest.fail(f"{command} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done


def _path_without(python, bin_dir):
    """PATH without this environment's bin/ (which holds ninja) and the fresh one's."""
    left_out = {os.path.realpath(os.path.dirname(python)), os.path.realpath(bin_dir)}
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and os.path.realpath(d) not in left_out]
    return os.pathsep.join(keep)


@pytest.fixture(scope="module")
def torch_site(tmp_path_factory):
    """A folder of links to this environment's site-packages without qrkd, ninja and the packaging tools."""
    site = Path(torch.__file__).resolve().parents[1]
    farm = tmp_path_factory.mktemp("torch-site")
    left_out = re.compile(r"^(qrkd|__editable__|_?_?editable|ninja|pip|setuptools|pkg_resources|wheel|_distutils_hack)"
                          r"|\.pth$", re.IGNORECASE)
    for entry in site.iterdir():
        if not left_out.search(entry.name):
            (farm / entry.name).symlink_to(entry)
    return farm


def _fresh_venv(path: Path, torch_site: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True)
    python = path / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], _clean_env(), path)
    (Path(purelib.stdout.strip()) / "torch_from_the_test_environment.pth").write_text(f"{torch_site}\n")
    probe = _run([python, "-c", "import torch, importlib.util; print(importlib.util.find_spec('qrkd'))"], _clean_env(),
                 path)
    assert probe.stdout.strip() == "None", "the fresh environment must not see this environment's qrkd"
    return python


def _checkout(target: Path) -> Path:
    """A copy of the working tree in target (tracked and untracked, not ignored: no .venv, build/ or built .so)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, target / rel)
    return target


@pytest.fixture(scope="module")
def source_install(tmp_path_factory, torch_site):
    """`pip install <checkout>`, default build isolation, in a fresh environment: (python, its bin/)."""
    python = _fresh_venv(tmp_path_factory.mktemp("venv") / "env", torch_site)
    checkout = _checkout(tmp_path_factory.mktemp("checkout"))
    _run([python, "-m", "pip", "install", "--quiet", checkout], _clean_env(), python.parents[1])
    return python, python.parent


@pytest.mark.install
def test_pip_install_ships_the_sources_and_falls_back_loudly_without_a_compiler(source_install, tmp_path):
    python, bin_dir = source_install
    listed = _run([python, "-c", "import qrkd._build as b; print(b.source_dir()); print(b.__file__)"], _clean_env(),
                  tmp_path)
    sources, module = listed.stdout.split()
    assert sources == os.path.join(os.path.dirname(module), "csrc"), "an installed qrkd holds its C++ sources"
    assert os.path.isfile(os.path.join(sources, "cpu", "rkd_angle.cpp"))
    # the Triton kernels install inside the package, and no top-level `kernels` module comes with them
    kernels = ("import importlib.util as u, os, qrkd.kernels as k\n"
               "print(os.path.dirname(os.path.dirname(k.__file__)), u.find_spec('kernels'))")
    package, top_level = _run([python, "-c", kernels], _clean_env(), tmp_path).stdout.split()
    assert package == os.path.dirname(module) and top_level == "None"

    # no compiler on PATH: backend="auto" warns once and runs on torch; QRKD_REQUIRE_EXT=1 makes that an error
    bare = _clean_env(PATH=str(bin_dir), QRKD_CACHE_DIR=str(tmp_path / "cache"))
    auto = ("import warnings, torch, qrkd\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    for _ in range(3): qrkd.rkd_angle_loss(torch.randn(8, 3), torch.randn(8, 4))\n"
            "ours = [str(w.message) for w in caught if str(w.message).startswith('qrkd:')]\n"
            "print(len(ours)); print(ours[0])")
    fell_back = _run([python, "-c", auto], bare, tmp_path)
    count, message = fell_back.stdout.split("\n", 1)
    assert count == "1" and "no C++ compiler" in message and "falling back to the pure-torch backend" in message
    assert BUILDING not in fell_back.stderr
    refused = _run([python, "-c", auto], dict(bare, QRKD_REQUIRE_EXT="1"), tmp_path, check=False)
    assert refused.returncode != 0 and "no C++ compiler" in refused.stderr and "QRKD_REQUIRE_EXT" in refused.stderr

    # `qrkd info` names remedies an installed user has (not the checkout's `make build`)
    info = _run([bin_dir / "qrkd", "info"], dict(bare, QRKD_JIT="0"), tmp_path).stdout
    assert "unset QRKD_JIT" in info and "make build" not in info
    assert not (tmp_path / "cache").exists()


@pytest.mark.install
def test_first_use_builds_once_and_later_processes_load_the_cache(source_install, tmp_path):
    python, bin_dir = source_install
    cache = tmp_path / "cache"
    # a compiler on PATH, the environment not activated (its bin/, with ninja, is not on PATH)
    env = _clean_env(PATH=_path_without(sys.executable, bin_dir), QRKD_CACHE_DIR=str(cache), QRKD_REQUIRE_EXT="1")
    # two processes at once: one builds, the other waits for it (or finds the build done), both run the cpp loss
    first = [subprocess.Popen([str(python), "-c", CHECK], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=1800) for p in first]
    for p, (out, err) in zip(first, outputs):
        assert p.returncode == 0, err
        assert "cpp: built on first use, cached in" in out
    assert sum(err.count(BUILDING) for _, err in outputs) == 1
    libraries = list(cache.rglob(f"{_build.NAME}.so"))
    assert len(libraries) == 1
    built = libraries[0].stat().st_mtime_ns

    # a later process with no compiler on PATH loads the cached build without building
    later = _run([python, "-c", CHECK], dict(env, PATH=str(bin_dir)), tmp_path)
    assert BUILDING not in later.stderr and "waiting" not in later.stderr
    assert f"cpp: built on first use, cached in {libraries[0].parent}" in later.stdout
    assert libraries[0].stat().st_mtime_ns == built


# ------------------------------------------------------------------------------------------------------ binary wheel


def _avx_instructions(library: Path) -> list:
    """Instructions of the library that need AVX or later (VEX/EVEX encoded: v* mnemonics, ymm/zmm registers)."""
    listing = _run(["objdump", "-d", "--no-show-raw-insn", library], _clean_env(), library.parent).stdout
    found = []
    for line in listing.splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0].strip().endswith(":"):
            continue
        mnemonic = parts[1].split()[0] if parts[1].split() else ""
        if (mnemonic.startswith("v") and mnemonic not in ("verr", "verw")) or re.search(r"%[yz]mm|%k[0-7]", parts[1]):
            found.append(line.strip())
    return found


@pytest.mark.install
def test_wheel_is_portable_pins_torch_and_runs_without_a_compiler(tmp_path, torch_site):
    checkout, dist = _checkout(tmp_path / "checkout"), tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps", "-w", dist, checkout],
         _clean_env(), cwd=tmp_path)
    (wheel,) = dist.glob("qrkd-*.whl")
    _, _, python_tag, abi_tag, platform_tag = wheel.stem.split("-")
    cpython = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert (python_tag, abi_tag) == (cpython, cpython) and platform_tag != "any"
    assert platform_tag.endswith(sysconfig.get_platform().split("-")[-1].replace("-", "_"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        libraries = {re.match(r"qrkd/(_C|_cpu_\w+?)\.", n).group(1): n for n in names
                     if re.fullmatch(r"qrkd/(_C|_cpu_\w+)\..*so", n)}
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        archive.extractall(tmp_path / "unpacked", members=libraries.values())
    assert "qrkd/csrc/extension.cpp" in names
    # the Triton kernels (kernels/ in the checkout) install as qrkd.kernels, nothing as a top-level `kernels`
    assert "qrkd/kernels/rkd_angle.py" in names and not [n for n in names if n.startswith("kernels/")]
    major, minor = torch.__version__.split(".")[:2]
    assert f"Requires-Dist: torch=={major}.{minor}.*" in metadata.splitlines()
    x86 = platform_tag.endswith("x86_64")
    if x86:  # the op schemas in _C, the CPU kernels once per level, nothing compiled with -march=native
        assert sorted(libraries) == sorted(["_C"] + [f"_cpu_{level}" for level in cpp.CPU_LEVELS])
        instructions = {name: _avx_instructions(tmp_path / "unpacked" / path) for name, path in libraries.items()}
        assert instructions["_C"] == [] and instructions["_cpu_x86_64"] == []
        assert [i for i in instructions["_cpu_x86_64_v3"] if "vfmadd" in i and "%ymm" in i]
        assert not [i for i in instructions["_cpu_x86_64_v3"] if re.search(EVEX_ONLY, i)]
        assert [i for i in instructions["_cpu_x86_64_v4"] if re.search(EVEX_ONLY, i)]
    else:
        assert sorted(libraries) == ["_C"]

    python = _fresh_venv(tmp_path / "env", torch_site)
    _run([python, "-m", "pip", "install", "--quiet", "--no-index", wheel], _clean_env(), tmp_path)
    bare = _clean_env(PATH=str(python.parent), QRKD_CACHE_DIR=str(tmp_path / "cache"), QRKD_REQUIRE_EXT="1",
                      QRKD_JIT="0")
    assert not any(shutil.which(cc, path=bare["PATH"]) for cc in ("c++", "g++", "gcc", "cc", "clang"))
    ran = _run([python, "-c", PARITY], bare, tmp_path)
    assert not (tmp_path / "cache").exists()
    if not x86:
        assert "cpp: qrkd._C (CPU kernels)" in ran.stdout
        return
    # the highest level this CPU runs is chosen; every other level it runs gives the same losses when asked for
    runs = importlib.import_module("qrkd._C").supported_cpu_levels()
    installed = ", ".join(cpp.CPU_LEVELS)
    assert f"cpp: qrkd._C (CPU kernels; the CPU ones for {runs[-1]}, chosen of {installed};" in ran.stdout
    for level in runs[:-1]:
        forced = _run([python, "-c", PARITY], dict(bare, QRKD_CPU_ISA=level), tmp_path)
        assert f"the CPU ones for {level}, chosen of" in forced.stdout
    for level in set(cpp.CPU_LEVELS) - set(runs):  # refused with the reason, not run into an illegal instruction
        refused = _run([python, "-c", PARITY], dict(bare, QRKD_CPU_ISA=level), tmp_path, check=False)
        assert refused.returncode == 1 and "this CPU does not run that instruction set" in refused.stderr
