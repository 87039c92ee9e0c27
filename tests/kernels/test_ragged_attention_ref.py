"""The ragged-attention reference against an independent computation: each head padded with zeros to the
widest head and run through F.scaled_dot_product_attention (zero columns change no score), masks included."""
import pytest
import torch
import torch.nn.functional as F

import vitslim_kernels
from vitslim_kernels import ragged_attention, ragged_attention_ref


def padded_sdpa(q, k, v, head_dims, scale, attn_mask=None):
    B, N, _ = q.shape
    wmax = max(max(head_dims), 1)
    out = torch.zeros_like(q)
    pads = []
    offset = 0
    for w in head_dims:
        pads.append([F.pad(t[..., offset:offset + w], (0, wmax - w)) for t in (q, k, v)])
        offset += w
    qp, kp, vp = (torch.stack([p[i] for p in pads], dim=1) for i in range(3))  # (B, H, N, wmax)
    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=attn_mask, scale=scale)
    offset = 0
    for h, w in enumerate(head_dims):
        out[..., offset:offset + w] = o[:, h, :, :w]
        offset += w
    return out


@pytest.mark.parametrize("head_dims", [(17, 0, 41, 1), (64, 63), (0, 0, 5), (1,)])
@pytest.mark.parametrize("n", [17, 50])
def test_reference_matches_padded_sdpa(head_dims, n):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, n, sum(head_dims), generator=g, dtype=torch.float64) for _ in range(3))
    scale = 64 ** -0.5
    expected = padded_sdpa(q, k, v, head_dims, scale)
    torch.testing.assert_close(ragged_attention_ref(q, k, v, head_dims, scale), expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(ragged_attention(q, k, v, head_dims, scale), expected, rtol=0, atol=1e-13)


def test_reference_takes_strided_views_and_gives_gradients():
    g = torch.Generator().manual_seed(1)
    head_dims = (5, 0, 3)
    qkv = torch.randn(2, 17, 3 * 8, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv[..., :8], qkv[..., 8:16], qkv[..., 16:]
    torch.autograd.gradcheck(lambda a, b, c: ragged_attention_ref(a, b, c, head_dims, 0.125), (q, k, v))


def test_bad_arguments():
    q = torch.zeros(2, 5, 8)
    with pytest.raises(ValueError, match=r"sum\(head_dims\) = 7"):
        ragged_attention(q, q, q, (4, 3), 0.1)
    with pytest.raises(ValueError, match="non-negative"):
        ragged_attention(q, q, q, (10, -2), 0.1)
    with pytest.raises(ValueError, match="same shape"):
        ragged_attention(q, q, torch.zeros(2, 6, 8), (4, 4), 0.1)
    with pytest.raises(ValueError, match=r"\(B, N, sum\(head_dims\)\)"):
        ragged_attention(q[0], q[0], q[0], (4, 4), 0.1)


def _masks(B: int, H: int, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Masks of every shape scaled_dot_product_attention broadcasts to (B, H, n, n); each keeps the diagonal, so no
    query loses every key."""
    keep = lambda *shape: (torch.rand(*shape, n, n, generator=g) < 0.6) | torch.eye(n, dtype=torch.bool)  # noqa: E731
    return {"bool (n, n)": keep(), "bool (B, 1, n, n)": keep(B, 1), "bool (B, H, n, n)": keep(B, H),
            "bool (H, n, n)": keep(H), "additive (n, n)": torch.randn(n, n, generator=g, dtype=torch.float64),
            "additive (1, H, n, n)": torch.randn(1, H, n, n, generator=g, dtype=torch.float64),
            "additive -inf (B, 1, 1, n)": torch.zeros(B, 1, 1, n, dtype=torch.float64).index_fill_(-1,
                                                                                                torch.tensor([2]),
                                                                                                float("-inf"))}


@pytest.mark.parametrize("mask", list(_masks(3, 4, 17, torch.Generator().manual_seed(0))))
def test_masked_reference_matches_padded_sdpa(mask):
    head_dims = (17, 0, 41, 1)
    g = torch.Generator().manual_seed(0)
    attn_mask = _masks(3, 4, 17, g)[mask]
    q, k, v = (torch.randn(3, 17, sum(head_dims), generator=g, dtype=torch.float64) for _ in range(3))
    expected = padded_sdpa(q, k, v, head_dims, 64 ** -0.5, attn_mask)
    got = ragged_attention(q, k, v, head_dims, 64 ** -0.5, attn_mask=attn_mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-13)
    unmasked = ragged_attention(q, k, v, head_dims, 64 ** -0.5)
    assert not torch.allclose(got[..., :17], unmasked[..., :17])  # the mask changed something


def test_a_mask_refuses_the_kernels_and_runs_the_reference():
    q = k = v = torch.randn(2, 5, 6)
    mask = torch.ones(5, 5, dtype=torch.bool)
    reasons = dict(vitslim_kernels.explain("ragged_attention", q, k, v, (4, 2), 0.5, 0.0, attn_mask=mask))
    for kernel in ("triton", "cuda"):
        assert "the kernels take no attention mask" in reasons[kernel]
    assert reasons["reference"] is None
    with pytest.raises(RuntimeError, match="'triton' cannot run here: the kernels take no attention mask"):
        ragged_attention(q, k, v, (4, 2), 0.5, attn_mask=mask, implementation="triton")
    with pytest.raises(ValueError, match=r"attn_mask of shape \(4, 5, 5\) does not broadcast to \(B, heads, N, N\) = "
                                         r"\(2, 2, 5, 5\)"):
        ragged_attention(q, k, v, (4, 2), 0.5, attn_mask=torch.ones(4, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be a boolean or floating tensor, got torch.int64"):
        ragged_attention(q, k, v, (4, 2), 0.5, attn_mask=torch.ones(5, 5, dtype=torch.long))
    one_head = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 5, 5\) does not broadcast"):  # SDPA refuses it too
        ragged_attention(one_head, one_head, one_head, (4,), 0.5, attn_mask=torch.ones(2, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask of shape \(5,\) does not broadcast"):
        ragged_attention(q, k, v, (4, 2), 0.5, attn_mask=torch.ones(5, dtype=torch.bool))


def test_a_query_that_may_see_no_key_gets_zeros():
    """As scaled_dot_product_attention gives (not NaN), for boolean and all -inf additive masks."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 5, 6, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(5, 5, dtype=torch.bool)
    keep[1] = False
    additive = torch.zeros(5, 5, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    for mask in (keep, additive):
        out = ragged_attention(q, k, v, (4, 2), 0.5, attn_mask=mask)
        assert torch.isfinite(out).all()
        assert (out[:, 1] == 0).all()
        torch.testing.assert_close(out[:, [0, 2, 3, 4]], ragged_attention(q, k, v, (4, 2), 0.5)[:, [0, 2, 3, 4]])
