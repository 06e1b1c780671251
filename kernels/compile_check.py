"""Compile the kernels for an NVIDIA target without a GPU (Triton ships ptxas), and count
their vectorised global loads.

``python -m gradsafe.kernels.compile_check`` prints one line per variant. The tests run it in
a subprocess (``TRITON_INTERPRET`` unset): it catches what the interpreter cannot (types,
layouts, unsupported operations) and checks that the aligned paths load 16 bytes at a time.
"""

from __future__ import annotations

import os
import re
import sys
import time

__all__ = ["compile_variants", "VARIANTS"]

_REDUCE_SIG = {"tiles_ptr": "*i64", "tens_ptr": "*i64", "gtab_ptr": "*i64", "groups_ptr": "*i64", "part_ptr": "*fp32", "CHUNK": "i64"}
_APPLY_SIG = {"tiles_ptr": "*i64", "tens_ptr": "*i64", "gtab_ptr": "*i64", "groups_ptr": "*i64", "w_ptr": "*fp64", "CHUNK": "i64"}
_FINAL_SIG = {
    "part_ptr": "*fp32", "coef_ptr": "*i64", "coefs_ptr": "*fp64", "w_ptr": "*fp64", "n_coef": "i32", "n_weight": "i32",
    "inst_ptr": "*i64", "col_ptr": "*i64", "pool_ptr": "*fp64", "z_ptr": "*fp64", "n_inst": "i32",
}

# (kernel, constexprs): fp32 / bf16 / fp16 gradients, fp32 / bf16 rows, the row-block sizes
# of k = 1, 4, 16 and 64, and the finalize with and without references
VARIANTS = [
    ("reduce_kernel", {"G_DT": 0, "U_DT": 0, "BLOCK": 2048, "RB": 2}),
    ("reduce_kernel", {"G_DT": 0, "U_DT": 1, "BLOCK": 512, "RB": 8}),
    ("reduce_kernel", {"G_DT": 1, "U_DT": 1, "BLOCK": 128, "RB": 32}),
    ("reduce_kernel", {"G_DT": 2, "U_DT": 0, "BLOCK": 128, "RB": 32}),
    ("apply_kernel", {"G_DT": 0, "U_DT": 0, "BLOCK": 4096, "RB": 1}),
    ("apply_kernel", {"G_DT": 0, "U_DT": 1, "BLOCK": 256, "RB": 16}),
    ("apply_kernel", {"G_DT": 1, "U_DT": 1, "BLOCK": 128, "RB": 32}),
    ("finalize_kernel", {"CB": 16, "JB": 256, "CJ": 16, "MAXR": 1, "HAS_R": False, "SWEEPS": 16, "ROUNDS": 4, "ZERO_W": True, "DEGEN": 1e-10}),
    ("finalize_kernel", {"CB": 256, "JB": 16, "CJ": 16, "MAXR": 1, "HAS_R": True, "SWEEPS": 16, "ROUNDS": 4, "ZERO_W": True, "DEGEN": 1e-10}),
    ("finalize_kernel", {"CB": 4096, "JB": 1, "CJ": 16, "MAXR": 16, "HAS_R": True, "SWEEPS": 16, "ROUNDS": 4, "ZERO_W": False, "DEGEN": 1e-10}),
]


def compile_variants(arch: int = 90, variants: list[tuple[str, dict]] = VARIANTS) -> list[dict]:
    """Compile each variant for ``sm_<arch>``; returns per variant its name, constexprs,
    seconds, and the number of 128-bit / all global loads in the PTX."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import INTERPRETED, apply, finalize, reduce

    if INTERPRETED:
        raise RuntimeError("compile_check needs the compiled kernels: unset TRITON_INTERPRET")
    sigs = {"reduce_kernel": _REDUCE_SIG, "apply_kernel": _APPLY_SIG, "finalize_kernel": _FINAL_SIG}
    fns = {"reduce_kernel": reduce.reduce_kernel, "apply_kernel": apply.apply_kernel,
           "finalize_kernel": finalize.finalize_kernel}
    target = GPUTarget("cuda", arch, 32)
    out = []
    for name, consts in variants:
        sig = dict(sigs[name])
        sig.update({k: "constexpr" for k in consts})
        t0 = time.perf_counter()
        ck = triton.compile(ASTSource(fn=fns[name], signature=sig, constexprs=consts), target=target)
        ptx = ck.asm["ptx"]
        out.append({
            "kernel": name,
            "constexprs": consts,
            "seconds": time.perf_counter() - t0,
            "v4_loads": len(re.findall(r"ld\.global[^\n]*\.v4\.", ptx)),
            "loads": len(re.findall(r"ld\.global", ptx)),
            "cubin_bytes": len(ck.asm.get("cubin", b"")),
        })
    return out


def main() -> int:
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    for r in compile_variants(arch):
        print(f"{r['kernel']:16s} {str(r['constexprs']):110s} {r['seconds']:5.1f}s "
              f"v4 loads {r['v4_loads']:3d} / {r['loads']:3d}  cubin {r['cubin_bytes']} B")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
