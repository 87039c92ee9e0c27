"""Which code path runs: one keyword, `implementation`, across the API.

- vitslim_kernels ops: "cuda", "triton", "reference" (None: dispatch picks the fastest that can run).
- A searchable model (make_searchable, set_implementation): "eager" (the paper's masks and explicit softmax),
  "folded" (the gates folded into the weights, exactly, and SDPA; plain PyTorch) or "fused" (the Triton kernels).
- A slim model (slim, load_slim): "reference" (plain PyTorch) or "fused" (dispatch picks the ragged-attention
  kernel per device).

`fused=True` (docs/design.md section 2's keyword, and the commands' --fused) stays accepted: it means "fused".
"""
from __future__ import annotations

import warnings

SEARCHABLE = ("eager", "folded", "fused")
SLIM = ("reference", "fused")


def chosen(implementation: str | None, fused: bool, accepted: tuple[str, ...], plain: str) -> str:
    """The implementation a call asks for: `implementation` if given (one of `accepted`), else "fused" when
    fused=True, else `plain`. Both given and disagreeing is a ValueError that names them."""
    if implementation is None:
        return "fused" if fused else plain
    if implementation not in accepted:
        raise ValueError(f"implementation must be one of {', '.join(map(repr, accepted))}, got {implementation!r}")
    if fused and implementation != "fused":
        raise ValueError(f"fused=True and implementation={implementation!r} disagree; give one of them")
    return implementation


_fused_warnings: set[str] = set()


def fused_fallback(reason: str) -> str:
    """"fused" asked of a searchable block but the kernels cannot run: say why once, and compute the same function
    with "folded" (returned)."""
    if reason not in _fused_warnings:
        warnings.warn(f"fused search kernels not used ({reason}); using the folded PyTorch path (same function)",
                      stacklevel=3)
        _fused_warnings.add(reason)
    return "folded"
