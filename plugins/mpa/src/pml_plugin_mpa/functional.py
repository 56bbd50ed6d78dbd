"""The computation the MPA family shares: class similarity S(x, c) (eq. 1) and the proxy
regulariser (eq. 3) of Saeki et al., from one fused (B x CK) matmul.

Proxies ``w`` have shape (C * K, d), row ``c * K + k`` holding proxy k of class c. The
normalised proxies w / ||w|| are never materialised: at Stanford-Online-Products scale that
copy (C K x d = 58M floats) costs as much memory traffic as the matmul itself. Instead
:class:`ProxyClassSimilarity` divides the (B x CK) matmul output by the proxy norms and
writes the gradient of the normalisation into the matmul's weight gradient in place.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

#: Norms are clamped here (as ``F.normalize`` does), so zero vectors give finite values.
NORM_EPS = 1e-12
#: eps inside the square root of eq. 3 (the SoftTriple reference code's value).
REG_EPS = 1e-5


class ProxyClassSimilarity(torch.autograd.Function):
    """Eq. 1 fused: S(x_i, c) = sum_k softmax_k(cos_ick / gamma) cos_ick with
    ``cos = x_n @ (w / ||w||).T`` (B x CK), and, with ``with_gram``, the per-class Gram
    matrices ``G[c] = W_c W_c^T`` of the normalised proxies (shape (C, K, K)) for eq. 3.

    ``x_n`` must already be L2-normalised (B x d is cheap to normalise with autograd).
    Gradients, for p = softmax_k(cos / gamma) and n_j = ||w_j||:
      dS_c / dcos_ck = p_ck (1 + (cos_ck - S_c) / gamma),
      dcos_ij / dw_j = x_i / n_j - cos_ij w_j / n_j^2,
      dG_jk / dw_j   = w_k / (n_j n_k) - G_jk w_j / n_j^2 (both triangles of symmetric G);
    the radial terms (multiples of w_j) and the Gram terms (within a class block) are folded
    into one batched ``baddbmm_`` on the weight gradient: one extra pass over w.
    """

    @staticmethod
    def forward(
        ctx, x_n: torch.Tensor, w: torch.Tensor, num_classes: int, proxies_per_class: int, gamma: float, with_gram: bool
    ):
        c, k, d = num_classes, proxies_per_class, w.shape[1]
        b = x_n.shape[0]
        if with_gram:
            w3 = w.view(c, k, d)
            raw = torch.bmm(w3, w3.transpose(1, 2))  # (C, K, K); its diagonal holds ||w||^2
            inv_n = raw.diagonal(dim1=1, dim2=2).clamp_min(NORM_EPS**2).rsqrt().reshape(-1)
            inv3 = inv_n.view(c, k)
            gram = raw.mul_(inv3[:, :, None]).mul_(inv3[:, None, :])
        else:
            inv_n = torch.linalg.vector_norm(w, dim=1).clamp_min(NORM_EPS).reciprocal()
            gram = w.new_zeros(())
            ctx.mark_non_differentiable(gram)
        cos = torch.mm(x_n, w.t()).mul_(inv_n)  # (B, CK) cosines
        if k == 1:  # the softmax over one proxy is 1: S is the cosine (ProxyAnchor)
            sim = cos.clone()
            e = z = cos.new_zeros(())
        else:
            inv_g = 1.0 / gamma
            cos3 = cos.view(b, c, k)
            if 2.0 * inv_g < _EXP_RANGE.get(cos.dtype, 0.0):
                # |cos| <= 1, so 1/gamma bounds the logits: a constant shift keeps exp in range
                # and spares the max-reduction over the short K axis (slow on CPU)
                e = torch.mul(cos3, inv_g).sub_(inv_g).exp_()
            else:
                e = torch.mul(cos3, inv_g)
                e = e.sub_(e.amax(dim=2, keepdim=True)).exp_()
            z = e.sum(dim=2)  # softmax denominators, >= exp(-2 / gamma) > 0
            sim = (e * cos3).sum(dim=2).div_(z)  # eq. 1
        ctx.save_for_backward(x_n, w, inv_n, cos, gram, e, z, sim)
        ctx.shape = (b, c, k, d)
        ctx.gamma = gamma
        ctx.with_gram = with_gram
        return sim, gram

    @staticmethod
    def backward(ctx, g_sim: torch.Tensor, g_gram: Optional[torch.Tensor]):
        x_n, w, inv_n, cos, gram, e, z, sim = ctx.saved_tensors
        b, c, k, d = ctx.shape
        gamma = ctx.gamma
        if k == 1:
            g_cos = g_sim.contiguous()
        else:
            # g_cos = g_S * p * (1 + (cos - S) / gamma) = g_S / (z gamma) * e * (cos - (S - gamma))
            g_cos = torch.sub(cos.view(b, c, k), (sim - gamma)[:, :, None])
            g_cos.mul_(e).mul_((g_sim / (z * gamma))[:, :, None])
            g_cos = g_cos.view(b, c * k)
        grad_x = grad_w = None
        radial = None
        if ctx.needs_input_grad[1]:
            # radial part of the cosine gradient: -(sum_i g_ij cos_ij) / n_j^2 * w_j
            radial = (g_cos * cos).sum(0).mul_(inv_n.square())
        g_scaled = g_cos.mul_(inv_n) if k > 1 else g_cos * inv_n  # dL/d(x.w_j) = g_ij / n_j
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g_scaled, w)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(g_scaled.t(), x_n)  # (CK, d)
            if ctx.with_gram and g_gram is not None:
                inv3 = inv_n.view(c, k)
                h = g_gram + g_gram.transpose(1, 2)
                block = h * inv3[:, :, None] * inv3[:, None, :]
                radial = radial.view(c, k) + (h * gram).sum(2) * inv3.square()
                block = block - torch.diag_embed(radial)
                grad_w.view(c, k, d).baddbmm_(block, w.view(c, k, d))
            else:
                grad_w.addcmul_(w, radial[:, None], value=-1.0)
        return grad_x, grad_w, None, None, None, None


#: exp(-x) stays a normal float for x below these (fp32: exp(-87.3) is the smallest normal).
_EXP_RANGE = {torch.float32: 80.0, torch.float64: 700.0}


def class_similarity(
    embeddings: torch.Tensor,
    proxies: torch.Tensor,
    num_classes: int,
    proxies_per_class: int,
    gamma: float,
    with_gram: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """S(x_i, c) = sum_k softmax_k(x_i.w_ck / gamma) x_i.w_ck on L2-normalised x, w (eq. 1).

    Args:
        embeddings: (B, d), any scale (normalised here), float32 or float64.
        proxies: (C * K, d), row c * K + k = proxy k of class c (normalised here), same dtype.
        num_classes: C.  proxies_per_class: K.  gamma: softmax temperature of eq. 1.
        with_gram: also return the per-class Gram matrices (C, K, K) of the normalised proxies.
    Returns:
        ``(S, gram)``: S of shape (B, C); gram (C, K, K) or None.
    """
    x_n = F.normalize(embeddings, p=2, dim=1, eps=NORM_EPS)
    sim, gram = ProxyClassSimilarity.apply(x_n, proxies, num_classes, proxies_per_class, gamma, with_gram)
    return sim, (gram if with_gram else None)


def proxy_regularizer(gram: torch.Tensor) -> torch.Tensor:
    """Eq. 3: sum_c sum_{t<s} sqrt(2 - 2 w_cs.w_ct + 1e-5) / (C K (K - 1)), from the
    (C, K, K) Gram matrices of the normalised proxies; 0 when K = 1."""
    c, k, _ = gram.shape
    if k < 2:
        return gram.new_zeros(())
    upper = torch.ones(k, k, dtype=torch.bool, device=gram.device).triu_(diagonal=1)  # pairs t < s
    # clamp: rounding can push a cosine a few ulp above 1; REG_EPS keeps sqrt differentiable.
    # A mask instead of gathering the pairs: gather/scatter of C x K(K-1)/2 entries is slower on CPU
    dist = ((2.0 - 2.0 * gram).clamp_min(0.0) + REG_EPS).sqrt()
    return (dist * upper).sum() / (c * k * (k - 1))
