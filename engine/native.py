"""The engine's own CPU kernel (engine/kernels/int8_weight_mm.cpp), built on first use.

    python -m engine.native     # build it now (e.g. in an image), say whether it is used and why not

`int8_weight_mm(x, q, scale)` is the W8A16 product `torch._weight_int8pack_mm` computes, with
each int8 weight vector converted once for up to 8 rows (the source says why, with numbers).
torch's extension builder (ninja + the system C++ compiler) builds it once per machine, source
and torch version, about 30 s, into `$HYBRID_LLM_KERNELS/<tag>` (default
~/.cache/hybrid-llm/kernels; a build found there is loaded without a compiler, so an image can
ship one), and its TORCH_LIBRARY block registers the op `hybrid_llm::int8_weight_mm`, which a
compiled graph calls like an ATen kernel. Its fastest kernels need AVX-512 BF16; on AVX2 + FMA
CPUs an fp32 kernel serves up to 8 rows and ATen's the rest. Where it cannot be had - no AVX2
(the source is written with x86 intrinsics), no compiler, a failed build, or
HYBRID_LLM_NATIVE=0 - `op()` returns None, the reason is logged once, and the engine keeps
`torch._weight_int8pack_mm`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import hardware
from .paths import cache_dir

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "kernels" / "int8_weight_mm.cpp"
_NAME = "hybrid_llm_kernels"
# an AVX2 + FMA baseline: the AVX-512 kernels carry target attributes and are chosen at run time
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]


def _build_dir() -> Path:
    root = os.environ.get("HYBRID_LLM_KERNELS") or cache_dir() / "kernels"
    # one directory per source and torch version: a changed kernel or torch never loads a stale build
    tag = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    return Path(root) / tag


def unavailable() -> str | None:
    """Why the kernel cannot be used on this machine, or None."""
    if os.environ.get("HYBRID_LLM_NATIVE", "1") == "0":
        return "HYBRID_LLM_NATIVE=0"
    missing = {"avx2", "fma"} - set(hardware.cpu_flags())
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    return None


@functools.cache
def op():
    """torch.ops.hybrid_llm.int8_weight_mm, built and loaded once; None where unavailable."""
    why = unavailable()
    if why is None:
        try:
            _load()
            return torch.ops.hybrid_llm.int8_weight_mm.default  # the overload: no resolution per call
        except Exception as e:  # noqa: BLE001 - any build failure means: use the ATen kernel
            why = f"building it failed ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]})"
    log.warning("engine kernel int8_weight_mm not used: %s; using torch._weight_int8pack_mm", why)
    return None


def _load() -> None:
    so = _build_dir() / f"{_NAME}.so"
    if so.is_file():  # built before (the directory is per source and torch version): no toolchain needed
        torch.ops.load_library(str(so))
    else:
        _build_and_load(so.parent)

    @torch.library.register_fake("hybrid_llm::int8_weight_mm")
    def _(x, q, scale):  # shapes for torch.compile's tracing
        return x.new_empty((x.shape[0], q.shape[0]))


def _build_and_load(final: Path) -> None:
    """Build in a directory of this process's own, load it from there, then rename it to `final`:
    a process that finds `final` finds a whole build (servers and replicas may start together)."""
    from torch.utils import cpp_extension

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        # is_python_module=False: a plain library, loaded here; its TORCH_LIBRARY block registers the op
        cpp_extension.load(name=_NAME, sources=[str(SOURCE)], extra_cflags=_FLAGS, build_directory=str(tmp),
                           is_python_module=False, verbose=False)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a build made by root from an image's user
        try:
            os.replace(tmp, final)
        except OSError:  # another process's build got there first: the same source and flags
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; the loaded library stays mapped


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kernel = op()
    print(f"int8_weight_mm: {'built in ' + str(_build_dir()) if kernel is not None else 'not used'}")
    sys.exit(0 if kernel is not None or unavailable() is not None else 1)  # a failed build is an error
