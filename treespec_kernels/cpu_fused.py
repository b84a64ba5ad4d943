"""Build and load the fused CPU forward (treespec_kernels/cpu_fused.c).

The C file is compiled once per source/flags hash with the system C compiler into a
cache directory and loaded with ctypes: no torch headers, so a build takes about a
second. It links the ``libgomp.so.1`` that torch has already loaded (same soname), so
both share one OpenMP thread pool. There are two builds (``isa()``): AVX512-BF16, with
AMX tiles where the CPU has them, and AVX2 + FMA (treespec_kernels/cpu_fused_avx2.h) for x86-64
CPUs without AVX-512. ``unsupported_reason()`` says why neither can run here (not x86-64
Linux, no AVX2/FMA, no compiler); callers then keep the torch path. The engine-side
wrapper that packs a model's weights is engine/fused.py.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_fused.c")
HEADERS = [os.path.join(os.path.dirname(SOURCE), "cpu_fused_avx2.h")]
_COMMON = ["-O3", "-fopenmp", "-shared", "-fPIC"]
FLAGS_BY_ISA = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-mamx-tile", "-mamx-bf16",
               "-mamx-int8"],
    "avx2": ["-mavx2", "-mfma"],
}

_lib: ctypes.CDLL | None = None
_amx: bool | None = None


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def has_amx() -> bool:
    """Whether the CPU has AMX-BF16 tiles (whether Linux grants them: ``use_amx``)."""
    return {"amx_bf16", "amx_tile"} <= cpu_flags()


def isa() -> str | None:
    """Which build of the kernel this CPU runs: "avx512" (AVX512-BF16 dot products, AMX
    tiles where present), "avx2" (AVX2 + FMA), or None. ``TREESPEC_CPU_ISA=avx2`` picks the
    AVX2 build on an AVX-512 CPU too (to test or measure it there)."""
    have = cpu_flags()
    has = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma"} <= have,
           "avx2": {"avx2", "fma"} <= have}
    forced = os.environ.get("TREESPEC_CPU_ISA", "auto")
    if forced != "auto":
        return forced if has.get(forced) else None
    return next((name for name in ("avx512", "avx2") if has[name]), None)


def flags() -> list[str]:
    """The compiler flags of this CPU's build (``isa()``)."""
    return os.environ.get("TREESPEC_CFLAGS_EXTRA", "").split() + _COMMON + FLAGS_BY_ISA[isa()]


def unsupported_reason() -> str | None:
    """None when the kernel can run on this machine, else a one-line reason."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64 Linux, this is {platform.system()} {platform.machine()}"
    forced = os.environ.get("TREESPEC_CPU_ISA", "auto")
    if forced not in ("auto", *FLAGS_BY_ISA):
        return f"TREESPEC_CPU_ISA must be auto, avx512 or avx2, got {forced!r}"
    if isa() is None:
        return f"the CPU lacks {forced}" if forced != "auto" else "the CPU has neither AVX512-BF16 nor AVX2 + FMA"
    if compiler() is None:
        return "no C compiler (cc/gcc) on PATH"
    return None


def load(build_dir: str) -> ctypes.CDLL:
    """Compile (once, atomically) and load the kernel library; raises RuntimeError if it cannot."""
    global _lib
    if _lib is not None:
        return _lib
    reason = unsupported_reason()
    if reason:
        raise RuntimeError(f"fused CPU kernel unavailable: {reason}")
    digest = hashlib.sha256(" ".join(flags()).encode())
    for name in [SOURCE, *HEADERS]:
        with open(name, "rb") as f:
            digest.update(f.read())
    tag = digest.hexdigest()[:16]
    path = os.path.join(build_dir, f"cpu_fused-{tag}.so")
    if not os.path.exists(path):
        os.makedirs(build_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=build_dir, suffix=".so")
        os.close(fd)
        res = subprocess.run([compiler(), *flags(), SOURCE, "-o", tmp], capture_output=True, text=True)
        if res.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling {SOURCE} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, path)  # concurrent builders race harmlessly: same bytes
    import torch  # noqa: F401  (libgomp.so.1 must be torch's, loaded first)

    lib = ctypes.CDLL(path)
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.fused_forward.restype = i
    lib.fused_forward.argtypes = [p, p]  # const Model*, const Batch* (engine/fused.py)
    lib.medusa_forward.restype = i
    lib.medusa_forward.argtypes = [p, ctypes.c_int64, p, p, p]  # const Medusa*, B, x, feats, logits
    lib.fused_amx_enable.restype = i
    lib.fused_gemv.restype = i  # shares, threads, K, X, M, Y, ldy (engine/fused.py pack_arenas)
    lib.fused_gemv.argtypes = [p, ctypes.c_int64, ctypes.c_int64, p, ctypes.c_int64, p, ctypes.c_int64]
    lib.fused_argmax.argtypes = [p, ctypes.c_int64, ctypes.c_int64, p, ctypes.c_int64]
    lib.fused_topk.argtypes = [p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, p, p, ctypes.c_int64]
    lib.eagle_propose.restype = i
    lib.eagle_propose.argtypes = [p, p]  # const Model*, EagleStep* (engine/fused.py)
    lib.fused_copy_rows.restype = i  # base, planes, rows per plane, row bytes, src, dst, n
    lib.fused_copy_rows.argtypes = [p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, p, p, ctypes.c_int64]
    lib.fused_stream_sum.restype = ctypes.c_double
    lib.fused_stream_sum.argtypes = [p, ctypes.c_int64, ctypes.c_int64]
    lib.fused_alloc.restype = p
    lib.fused_alloc.argtypes = [ctypes.c_uint64]
    lib.fused_free.argtypes = [p]
    _lib = lib
    return lib


def use_amx(lib: ctypes.CDLL) -> bool:
    """Whether GEMVs run on AMX tiles: the CPU has AMX-BF16, Linux grants the tile state
    and ``TREESPEC_CPU_AMX`` is not 0 (AVX512-BF16 dot products otherwise)."""
    global _amx
    if os.environ.get("TREESPEC_CPU_AMX", "1") == "0":
        return False
    if _amx is None:
        _amx = isa() == "avx512" and has_amx() and lib.fused_amx_enable() == 0
    return _amx


def int8_weights(lib: ctypes.CDLL) -> bool:
    """Whether a drafter can keep int8 weights here (engine/fused.py): on AMX-INT8 tiles
    (``use_amx_int8``), with AVX512-VNNI byte dot products where the AVX-512 build runs
    without tiles (gemv_vnni_i8), or in the AVX2 build, which widens int8 panels to fp32 in
    registers."""
    if isa() == "avx512" and not use_amx(lib):
        return "avx512_vnni" in cpu_flags()
    return use_amx_int8(lib) or isa() == "avx2"


def use_amx_int8(lib: ctypes.CDLL) -> bool:
    """Whether int8 drafter weights can run (engine/fused.py): AMX in use (``use_amx``) and
    the CPU has AMX-INT8 (TDPBSSD)."""
    return use_amx(lib) and "amx_int8" in cpu_flags()
