"""A kernel for ``test_triton_compile.py``'s check of the build harness itself: one case that builds
cleanly, one that holds 256 float32 values per thread (more than the 255 registers a thread has, so
ptxas must spill) and one whose signature names an argument the kernel does not have."""

import triton
import triton.language as tl

from product_key_memory.ops._triton import CompileCase


@triton.jit
def _hold_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    s = tl.sum(x * x, axis=0)  # every x stays live across the reduction
    tl.store(y_ptr + offs, x / (s + x))


def compile_cases():
    sig = dict(x_ptr="*fp32", y_ptr="*fp32")
    return [
        CompileCase("fits", _hold_kernel, sig, dict(BLOCK=128), num_warps=4, divisible=(0, 1)),
        CompileCase("spills", _hold_kernel, sig, dict(BLOCK=8192), num_warps=1),
        CompileCase("bad signature", _hold_kernel, dict(sig, z_ptr="*fp32"), dict(BLOCK=128)),
    ]
