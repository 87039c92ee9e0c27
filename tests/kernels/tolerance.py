"""The accuracy rule of docs/conventions.md for kernels run in low precision."""
import torch


def assert_within_spec(name: str, got: torch.Tensor, ref_same_dtype: torch.Tensor, expected: torch.Tensor,
                       floor_eps: float, eps_dtype: torch.dtype) -> None:
    """The kernel's error against `expected` (float64) is at most twice the error of the reference run in the
    same precision, plus `floor_eps` eps of `eps_dtype` times the largest |expected| (at least 1). Nothing NaN."""
    assert not torch.isnan(got).any(), f"{name}: NaN left (an element the kernel never wrote?)"
    err = (got.double() - expected).abs().max().item()
    ref_err = (ref_same_dtype.double() - expected).abs().max().item()
    bound = 2 * ref_err + floor_eps * torch.finfo(eps_dtype).eps * max(expected.abs().max().item(), 1.0)
    assert err <= bound, f"{name}: kernel error {err:.3g} > bound {bound:.3g} (reference error {ref_err:.3g})"
