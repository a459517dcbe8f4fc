"""Build script: the optional CUDA extension taillor._C (batched randomized SVD). Metadata is in pyproject.toml.

taillor._C is built only when torch has CUDA, a CUDA toolkit with nvcc is found (CUDA_HOME, else the toolkit of
the nvcc on PATH, else /usr/local/cuda) and TAILLOR_NO_CUDA_EXT is not "1"; otherwise one line says why and the
package installs without it (taillor then runs the same algorithm in PyTorch). A failed compile prints one line
and installs without the extension. With TAILLOR_REQUIRE_CUDA_EXT=1 (CI, benchmarks/gpu_check.sh) the build is
required: a failed compile and every reason to skip it but TAILLOR_NO_CUDA_EXT=1 (no CUDA torch, no toolkit, no
cuBLAS/cuSOLVER) are errors, so a run that needs the extension can never go on without it. `taillor info` says whether it is built.
Install with `pip install --no-build-isolation -e .` so the build sees the installed torch.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

_REQUIRE = os.environ.get("TAILLOR_REQUIRE_CUDA_EXT") == "1"


def _say(msg):
    print(f"taillor: {msg}", file=sys.stderr, flush=True)


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime_api.h")
    )


def _find_cuda_home():
    """CUDA_HOME / CUDA_PATH, else the toolkit holding the nvcc on PATH, else /usr/local/cuda (real paths)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.path.realpath(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        # The nvcc on PATH may be a symlink into a toolkit (resolved here) or a wrapper script, whose folder
        # is not a toolkit; then the conventional /usr/local/cuda link is the best guess.
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(home):
            return home
    if _is_toolkit("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda")
    return None


def _math_lib_dirs(cuda_home, cuda_major):
    """(include dir, lib dir) pairs that may hold cuBLAS/cuSOLVER, best first: the nvidia-* wheels torch
    itself loads at runtime (nvidia/cu13 for CUDA 13, nvidia/cublas etc. for CUDA 12), then the toolkit."""
    pairs = []
    for site in sys.path:
        base = os.path.join(site, "nvidia")
        if not os.path.isdir(base):
            continue
        for sub in [f"cu{cuda_major}"] + sorted(os.listdir(base)):
            pairs.append((os.path.join(base, sub, "include"), os.path.join(base, sub, "lib")))
    pairs.append((os.path.join(cuda_home, "include"), os.path.join(cuda_home, "lib64")))
    return pairs


def _find_math_lib(pairs, header, lib):
    """Folder of `header`, folder of `lib`, and the linker argument for it (-lNAME, or -l:libNAME.so.N when
    only versioned files exist, as in the nvidia-* wheels)."""
    include = next((inc for inc, _ in pairs if os.path.isfile(os.path.join(inc, header))), None)
    for _, libdir in pairs:
        if os.path.isfile(os.path.join(libdir, f"lib{lib}.so")):
            return include, libdir, f"-l{lib}"
        names = [os.path.basename(f) for f in glob.glob(os.path.join(libdir, f"lib{lib}.so.*"))]
        versioned = [name for name in names if re.fullmatch(rf"lib{lib}\.so\.\d+", name)]
        if versioned:
            return include, libdir, "-l:" + max(versioned, key=lambda name: int(name.rsplit(".", 1)[1]))
    return include, None, None


def _skip(reason):
    """([], {}) after one line saying why the extension is skipped; an error when it is required."""
    if _REQUIRE:
        raise SystemExit(f"taillor: TAILLOR_REQUIRE_CUDA_EXT=1, but the CUDA extension taillor._C cannot be built: "
                         f"{reason}")
    _say(f"skipping the CUDA extension taillor._C: {reason}")
    return [], {}


def _cuda_extension():
    """(ext_modules, cmdclass) for taillor._C, or ([], {}) after one line saying why it is skipped."""
    if os.environ.get("TAILLOR_NO_CUDA_EXT") == "1":  # an explicit skip wins (the demos' installs in CI)
        _say("skipping the CUDA extension taillor._C: TAILLOR_NO_CUDA_EXT=1")
        return [], {}
    try:
        import torch
    except ImportError:
        return _skip("torch is not importable (install torch first, then pip install --no-build-isolation)")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is built without CUDA")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return _skip("no CUDA toolkit with nvcc found (set CUDA_HOME)")
    cuda_major = torch.version.cuda.split(".")[0]
    pairs = _math_lib_dirs(cuda_home, cuda_major)
    link_args, include_dirs = [], [os.path.join(cuda_home, "include")]
    for header, lib in (("cublas_v2.h", "cublas"), ("cusolverDn.h", "cusolver")):
        include, libdir, flag = _find_math_lib(pairs, header, lib)
        if include is None or flag is None:
            return _skip(f"{header} or lib{lib}.so not found (CUDA_HOME={cuda_home}, nvidia-* wheels)")
        if include not in include_dirs:
            include_dirs.append(include)
        for arg in (f"-L{libdir}", f"-Wl,-rpath,{libdir}", flag):
            if arg not in link_args:
                link_args.append(arg)

    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, but a failed build installs without taillor._C unless TAILLOR_REQUIRE_CUDA_EXT=1."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler, linker or toolkit-version errors
                if _REQUIRE:
                    raise
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                _say(f"building the CUDA extension taillor._C FAILED ({reason}); installing WITHOUT it: "
                     "randomized_svd runs its PyTorch path (`taillor info` says cuda_extension: missing; "
                     "TAILLOR_REQUIRE_CUDA_EXT=1 makes this an error)")
                self.extensions = []

    ext = cpp_extension.CUDAExtension(
        name="taillor._C",
        sources=["csrc/bindings.cpp", "csrc/randomized_svd.cu"],
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3"]},
        extra_link_args=link_args,
    )
    return [ext], {"build_ext": BuildExtension}


_ext_modules, _cmdclass = _cuda_extension()
setup(ext_modules=_ext_modules, cmdclass=_cmdclass)
