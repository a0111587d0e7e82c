"""Build script for kvsparse.

Two extension modules share one set of plain-C kernels (csrc/kernels/*.c):
  kvsparse._C          torch custom ops (csrc/ops/*.cpp: one file per method
                       plus the module), and the CUDA kernels
                       (csrc/kernels/*.cu) when built with CUDA;
  kvsparse._kernels_np a CPython/NumPy C-API module (csrc/numpy/*.c: one file
                       per method plus the module and the checks they share)
                       over the CPU kernels, usable without torch.

Environment variables:
  KVSPARSE_CUDA=1|0      force the CUDA kernels on or off (default: on when
                         torch has CUDA and nvcc is found);
  KVSPARSE_CUDA_ARCH     nvcc targets, e.g. "80;90" (default "80;90");
  KVSPARSE_SANITIZE=1    build the C/C++ code with -fsanitize=address,undefined -fno-wrapv
                         (run python with LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)");
  KVSPARSE_DEBUG=1       -O0 -g instead of -O3.
No network access happens at build time.
"""
import glob
import os
import shutil

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

import numpy
import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
KDIR = os.path.join("csrc", "kernels")
NPDIR = os.path.join("csrc", "numpy")


def _flag(name):
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    return v.strip().lower() in ("1", "on", "yes", "true", "y")


def _want_cuda():
    forced = _flag("KVSPARSE_CUDA")
    have = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc"))
    if forced is True and not have:
        raise RuntimeError("KVSPARSE_CUDA=1 but torch has no CUDA or nvcc was not found")
    return have if forced is None else forced


SANITIZE = bool(_flag("KVSPARSE_SANITIZE"))
DEBUG = bool(_flag("KVSPARSE_DEBUG"))
WITH_CUDA = bool(_want_cuda())

opt = ["-O0", "-g"] if DEBUG else ["-O3"]
# -fno-wrapv: CPython's flags carry -fwrapv, under which UBSan cannot see signed overflow
san = ["-fsanitize=address,undefined,signed-integer-overflow", "-fno-wrapv", "-fno-omit-frame-pointer",
       "-fno-sanitize-recover=all"] if SANITIZE else []
C_FLAGS = ["-std=c99", "-fPIC", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"] + opt + san
CXX_FLAGS = ["-fopenmp"] + opt + san
LINK_FLAGS = ["-fopenmp"] + san

C_KERNELS = sorted(glob.glob(os.path.join(KDIR, "*.c")))
CU_KERNELS = sorted(glob.glob(os.path.join(KDIR, "*.cu")))
NP_SOURCES = sorted(glob.glob(os.path.join(NPDIR, "*.c")))


class Build(BuildExtension):
    """Compiles the C99 kernels once with the C compiler and plain C flags,
    then links the objects into both extension modules."""

    def build_extensions(self):
        objs = self.compiler.compile(C_KERNELS, output_dir=self.build_temp,
                                     include_dirs=[KDIR], extra_postargs=C_FLAGS)
        np_ext = [e for e in self.extensions if e.name == "kvsparse._kernels_np"]
        if np_ext:
            objs_np = self.compiler.compile(NP_SOURCES, output_dir=self.build_temp,
                                            include_dirs=[KDIR, numpy.get_include()] + self.include_dirs,
                                            extra_postargs=C_FLAGS)
            np_ext[0].extra_objects = objs_np
        for ext in self.extensions:
            ext.extra_objects = list(ext.extra_objects or []) + objs
        super().build_extensions()

    def build_extension(self, ext):
        if ext.name == "kvsparse._kernels_np":
            # pure C module: no torch flags, only the precompiled objects. It has
            # no sources left, and torch's ninja compile wrapper refuses an empty
            # source list, so skip compiling and only link.
            compile_ = self.compiler.compile
            self.compiler.compile = lambda sources, *a, **kw: compile_(sources, *a, **kw) if sources else []
            try:
                return _setuptools_build_ext.build_extension(self, ext)
            finally:
                self.compiler.compile = compile_
        return super().build_extension(ext)


torch_sources = sorted(glob.glob(os.path.join("csrc", "ops", "*.cpp")))
define_macros = []
if WITH_CUDA:
    archs = os.environ.get("KVSPARSE_CUDA_ARCH", "80;90").replace(",", ";").split(";")
    gencode = []
    for a in archs:
        a = a.strip()
        if a:
            gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
    define_macros.append(("KVSPARSE_WITH_CUDA", "1"))
    torch_ext = CUDAExtension(
        "kvsparse._C",
        torch_sources + CU_KERNELS,
        include_dirs=[os.path.join(HERE, KDIR)],
        define_macros=define_macros,
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"] + gencode},
        extra_link_args=LINK_FLAGS,
    )
else:
    torch_ext = CppExtension(
        "kvsparse._C",
        torch_sources,
        include_dirs=[os.path.join(HERE, KDIR)],
        define_macros=define_macros,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=LINK_FLAGS,
    )

# Sources are compiled in Build.build_extensions; a placeholder keeps setuptools happy.
# A plain setuptools Extension (not CppExtension): the module must not link libtorch.
np_ext = Extension("kvsparse._kernels_np", NP_SOURCES, libraries=["m"], extra_link_args=LINK_FLAGS)
np_ext.sources = []

setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[torch_ext, np_ext],
    cmdclass={"build_ext": Build},
    zip_safe=False,
)
