"""Builds qrkd and its extension qrkd._C: CPU kernels always, CUDA kernels when a CUDA toolkit and a CUDA torch are
present (FORCE_CUDA=1 forces them, QRKD_NO_CUDA=1 leaves them out).

The extension compiles here only when torch is importable, so with --no-build-isolation against the torch you run:
`pip install --no-build-isolation -e ".[dev]"` (in place, -march=native) or `pip wheel --no-build-isolation .` (a
portable x86-64 wheel that requires the same torch major.minor: its CPU kernels are compiled once per x86-64 level,
and the running CPU's is chosen at run time). A plain `pip install .` builds in an isolated
environment without torch: the package then holds no qrkd._C, only its C++ sources (qrkd/csrc, shipped in every
install), and builds the extension on first use (qrkd/_build.py)."""

import glob
import os
import platform
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# torch.utils.cpp_extension reads these when it is imported
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _csrc_files():
    return sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)
                  + glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
                  + glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))


class build_py_with_sources(build_py):
    """Also copies csrc/ into the built package as qrkd/csrc, where qrkd/_build.py finds the sources to build the
    extension on first use (an editable install reads csrc/ in the checkout)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for path in _csrc_files():
            target = os.path.join(self.build_lib, "qrkd", path)
            self.mkpath(os.path.dirname(target))
            self.copy_file(path, target)


# the CPU kernel modules of a portable x86-64 wheel, one per micro-architecture level: qrkd._C then holds the op
# schemas and the CUDA kernels, and qrkd.backends.cpp loads the highest level the running CPU has
CPU_LEVELS = ("x86_64", "x86_64_v3", "x86_64_v4")  # qrkd/backends/cpp.py's
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def _build_ext_class(BuildExtension, CppExtension):
    class build_ext(BuildExtension.with_options(use_ninja=True)):
        """-march=native only for a build that stays on this machine (build_ext --inplace, an editable install). A
        wheel (`pip install --no-build-isolation .`, `pip wheel .`, bdist_wheel) carries no debug information and runs
        on any x86-64 CPU: its CPU kernels are compiled once per level in CPU_LEVELS, chosen at run time."""

        def finalize_options(self):
            in_place = self.inplace or getattr(self, "editable_mode", False)
            portable = not in_place or _flag("QRKD_PORTABLE")
            extensions = self.distribution.ext_modules
            for ext in extensions:
                ext.extra_compile_args["cxx"] += ([] if portable else ["-march=native"]) + ([] if in_place else ["-g0"])
            if not in_place and platform.machine().lower() in ("x86_64", "amd64"):
                (core,) = extensions
                cpu_modules = [_cpu_module(core, level) for level in CPU_LEVELS]
                extensions[:] = [_without_cpu_kernels(core)] + cpu_modules
            else:
                for ext in extensions:
                    ext.extra_compile_args["cxx"].append(f"-DQRKD_CPU_KERNELS={'portable' if portable else 'native'}")
            super().finalize_options()

        def build_extension(self, ext):
            # the CPU modules compile the same sources with other flags: one object folder per module
            shared = self.build_temp
            self.build_temp = os.path.join(shared, ext.name)
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = shared

    def _without_cpu_kernels(core):
        core.sources = [s for s in core.sources if not _is_cpu_kernel(s)]
        core.extra_compile_args["cxx"].append("-DQRKD_CPU_KERNELS=none")
        return core

    def _cpu_module(core, level):
        sources = [os.path.join("csrc", "extension.cpp")] + [s for s in core.sources if _is_cpu_kernel(s)]
        flags = list(core.extra_compile_args["cxx"]) + [f"-march={level.replace('_', '-')}",
                                                         f"-DQRKD_CPU_KERNELS={level}"]
        return CppExtension(name=f"qrkd._cpu_{level}", sources=sources, include_dirs=[CSRC],
                            extra_compile_args={"cxx": flags}, extra_link_args=core.extra_link_args)

    return build_ext


def _is_cpu_kernel(source):
    return os.path.normpath(os.path.dirname(source)) == os.path.join("csrc", "cpu")


def extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("qrkd setup: torch is not importable here (pip's isolated build): the package holds the C++ sources and "
              "builds its extension on first use; `--no-build-isolation` compiles it now", file=sys.stderr)
        return [], {}
    if _flag("QRKD_SKIP_EXT"):  # the Makefile installs first, then builds the extension in place once
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpp_sources:
        return [], {}
    with_cuda = bool(cuda_sources) and not _flag("QRKD_NO_CUDA") and CUDA_HOME is not None and (
        _flag("FORCE_CUDA") or (torch.version.cuda is not None)
    )
    # -fno-math-errno: the kernels never read errno, and with it set GCC calls libm for sqrt and keeps the loop scalar
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]  # qrkd/_build.py's JIT build uses the same
    define = []
    kwargs = dict(
        name="qrkd._C",
        include_dirs=[CSRC],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # with no GPU visible torch's arch detection fails
        define = [("WITH_CUDA", None)]
        ext = CUDAExtension(
            sources=cpp_sources + cuda_sources,
            define_macros=define,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
            **kwargs,
        )
    else:
        ext = CppExtension(sources=cpp_sources, define_macros=define, extra_compile_args={"cxx": cxx}, **kwargs)
    print(f"qrkd setup: building qrkd._C with {'CPU + CUDA' if with_cuda else 'CPU'} kernels", file=sys.stderr)
    return [ext], {"build_ext": _build_ext_class(BuildExtension, CppExtension)}


ext_modules, cmdclass = extensions()
if ext_modules:  # qrkd._C is tied to the C++ ABI of the torch it was compiled against
    import torch

    requirements = ["torch=={}.{}.*".format(*torch.__version__.split(".")[:2])]
else:  # built on first use (qrkd/_build.py), with ninja
    requirements = ["torch>=2.11", "ninja"]

setup(
    name="qrkd",
    version="0.1.0",
    description="Fast, exact, differentiable relational knowledge-distillation losses (RKD, QRKD) for PyTorch",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # the Triton kernels live at the top of the repository (kernels/) and install as qrkd.kernels: nothing named
    # `kernels` lands at the top of site-packages
    packages=find_packages(include=["qrkd", "qrkd.*"]) + ["qrkd.kernels"],
    package_dir={"qrkd.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_py": build_py_with_sources, **cmdclass},
    install_requires=requirements + ["numpy", "tqdm"],
    extras_require={
        "merlin": ["merlinquantum==0.4.2"],
        "vision": ["torchvision>=0.26"],
        "plots": ["matplotlib"],
        "triton": ["triton>=3.6"],
        "dev": [
            "torch==2.12.*",
            "torchvision==0.27.*",
            "triton",
            "merlinquantum==0.4.2",
            "matplotlib",
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "ninja",
            "tqdm",
            "torchdistill==1.1.5",  # qrkd.integrations.torchdistill, examples/torchdistill
        ],
    },
    entry_points={"console_scripts": ["qrkd=qrkd.cli:main"]},
    zip_safe=False,
)
