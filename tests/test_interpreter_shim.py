"""The conftest shim that makes Triton's interpreter round fp32 -> bf16 like a GPU (and like
torch): if a Triton upgrade moves the function it patches, this fails instead of the kernel
tests silently measuring a truncating interpreter."""

import pytest
import torch

from conftest import HAS_TRITON, INTERPRETING

pytestmark = pytest.mark.skipif(not (HAS_TRITON and INTERPRETING), reason="only relevant under TRITON_INTERPRET=1")


def test_shim_is_installed():
    from triton.runtime import interpreter

    assert getattr(interpreter._convert_float, "hf_rmsnorm_shim", False)


def test_interpreted_kernel_rounds_bf16_to_nearest_even(monkeypatch):
    from hf_rmsnorm.ops import rms_norm

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    torch.manual_seed(0)
    xb = torch.randn(64, 256).to(torch.bfloat16)
    y = rms_norm(xb)
    exact = xb.double() / xb.double().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    correctly_rounded = exact.to(torch.bfloat16)
    # a truncating cast is off by up to a whole ulp; round-to-nearest by at most half of one
    assert (y.double() - exact).abs().max() <= (correctly_rounded.double() - exact).abs().max() + 1e-6
    assert (y != correctly_rounded).float().mean() < 0.01
