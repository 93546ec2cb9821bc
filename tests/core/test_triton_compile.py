"""Every Triton kernel of the library compiles for NVIDIA GPUs, here on a machine without one.

Triton's CPU interpreter checks what the kernels compute (tests/core/test_fast_moments.py,
tests/gradients/test_ce_kernel.py), but not that they compile: the interpreter accepts code that the
GPU compiler rejects (dot shapes, layouts, branches inside loops). The Triton wheel ships ``ptxas``,
so each kernel is compiled ahead of time here to a cubin for an H100 (sm_90) and an A100 (sm_80),
with the launch settings the library uses, and its shared memory is checked against the device's
limit. Compiled with the installed Triton, which may differ from the one on a GPU machine.
"""

from __future__ import annotations

import inspect

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
SHARED_LIMIT = {90: 232_448, 80: 166_912}  # bytes of shared memory a block may use (opt-in maximum)

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")


def _compile(kernel, types: dict[str, str], constants: dict, target, **options):
    assert set(types) | set(constants) == set(kernel.arg_names)
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
        constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items()}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    else:  # Triton 3.0 / 3.1 (torch 2.4 / 2.5): the non-constexpr arguments' types, constexprs by name
        signature = {name: types[name] for name in kernel.arg_names if name in types}
        source = ASTSource(fn=kernel, signature=signature, constants=dict(constants))
    return triton.compile(source, target=target, options=options)


def _cases():
    from spectral_lens.gradients import _ce_kernel as ce
    from spectral_lens.spectra import _center_kernel as center

    for x in ("*bf16", "*fp32"):
        for valid in (True, False):
            yield (f"center_cast {x} valid={valid}", center._center_cast_kernel,
                   dict(x_ptr=x, shift_ptr="*fp64", valid_ptr="*u8", y_ptr="*bf16", part_ptr="*fp32",
                        n="i32", d="i32", stride_x="i32", stride_y="i32"),
                   dict(HAS_VALID=valid, BLOCK_R=center.BLOCK_R, BLOCK_C=center.BLOCK_C, TILES=center.TILES),
                   dict(num_warps=center.NUM_WARPS))
    for tiles, block_r, warps in ((8, 64, 4), (16, 128, 8)):  # the looped launches bench_covariance sweeps
        yield (f"center_cast looped {tiles}x{block_r}", center._center_cast_kernel,
               dict(x_ptr="*bf16", shift_ptr="*bf16", valid_ptr="*u8", y_ptr="*bf16", part_ptr="*fp32",
                    n="i32", d="i32", stride_x="i32", stride_y="i32"),
               dict(HAS_VALID=False, BLOCK_R=block_r, BLOCK_C=128, TILES=tiles), dict(num_warps=warps))
    for z in ("*bf16", "*fp32"):
        common = dict(num_warps=ce.NUM_WARPS)
        for smooth in (False, True):  # label smoothing: a constexpr branch of each kernel
            consts = dict(BLOCK_V=ce.BLOCK_V, SMOOTH=smooth)
            yield (f"row_lse {z} smooth={smooth}", ce._row_lse_kernel,
                   dict(z_ptr=z, t_ptr="*i64", m_ptr="*fp32", ls_ptr="*fp32", loss_ptr="*fp32", V="i32", stride="i32",
                        eps="fp32"),
                   consts, common)
            yield (f"softmax_grad {z} smooth={smooth}", ce._softmax_grad_kernel,
                   dict(z_ptr=z, t_ptr="*i64", m_ptr="*fp32", ls_ptr="*fp32", w_ptr="*fp32", g_ptr=z, V="i32",
                        stride_z="i32", stride_g="i32", eps="fp32"),
                   consts, common)
            yield (f"lse_and_grad {z} smooth={smooth}", ce._lse_and_grad_kernel,
                   dict(z_ptr=z, t_ptr="*i64", w_ptr="*fp32", m_ptr="*fp32", ls_ptr="*fp32", loss_ptr="*fp32",
                        g_ptr=z, V="i32", stride_z="i32", stride_g="i32", eps="fp32"),
                   consts, common)


CASES = list(_cases())


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_compiles_for_nvidia(case, target):
    _, kernel, types, constants, options = case
    try:
        compiled = _compile(kernel, types, constants, target, **options)
    except RuntimeError as exc:  # a Triton build without the NVIDIA tool chain
        if "ptxas" in str(exc).lower() and "not found" in str(exc).lower():
            pytest.skip(f"no ptxas in this Triton: {exc}")
        raise
    assert len(compiled.asm["cubin"]) > 0
    assert compiled.metadata.shared <= SHARED_LIMIT[target.arch]  # else the launch fails: out of resources
