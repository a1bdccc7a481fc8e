"""The embedded-Gaussian non-local block: the "refine" step of Libra R-CNN's BFP.

Non-local block (Wang et al., "Non-local Neural Networks", 2018), embedded-Gaussian form, as Libra
R-CNN (Pang et al., 2019) uses it on the balanced semantic feature::

    theta = W_theta x,  phi = W_phi x,  g = W_g x          (1x1 convs, C -> C channels)
    y_i   = sum_j softmax_j(theta_i . phi_j) g_j             (softmax over the H*W positions,
                                                             NO 1/sqrt(d) scaling)
    z     = x + W_z y                                        (W_z: 1x1 conv initialised to zero,
                                                             so the block starts as identity)

The attention is (H*W) x (H*W). Two implementations, chosen by ``MODEL.BFP.ATTENTION``:

- "sdpa" (default): ``torch.nn.functional.scaled_dot_product_attention`` with ``scale=1.0``.
  PyTorch dispatches it to a fused kernel (flash attention on CPU in torch >= 2.2, flash /
  memory-efficient attention on CUDA) whose memory grows linearly with H*W in the forward and the
  backward pass; ``benchmarks/bench_bfp.py`` measures it against the materialised matrix. Where
  PyTorch has no fused kernel for the inputs, it falls back to its own "math" path, which does
  materialise the matrix.
- "materialized": the plain (HW x HW) softmax matrix; the reference the tests compare with.
"""

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d

__all__ = ["NonLocal2d", "embedded_gaussian_attention", "ATTENTION_IMPLS"]

#: Implementations of :func:`embedded_gaussian_attention`.
ATTENTION_IMPLS = ("sdpa", "materialized")


def embedded_gaussian_attention(query, key, value, impl="sdpa"):
    """
    ``softmax(query @ key^T) @ value`` with the softmax over keys and no 1/sqrt(d) scaling.

    Args:
        query (Tensor): (N, Lq, C).
        key (Tensor): (N, Lk, C).
        value (Tensor): (N, Lk, Cv).
        impl (str): "sdpa" or "materialized" (see the module docstring).

    Returns:
        Tensor: (N, Lq, Cv).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl = {impl!r} is invalid: expected one of {ATTENTION_IMPLS}.")
    if query.numel() == 0 or key.shape[1] == 0:
        return query.new_zeros(query.shape[0], query.shape[1], value.shape[-1])
    if impl == "materialized":
        return torch.softmax(query @ key.transpose(-1, -2), dim=-1) @ value
    # SDPA's fused CPU kernel needs 4-D inputs with a contiguous last dim.
    q, k, v = (t.unsqueeze(1).contiguous() for t in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v, scale=1.0).squeeze(1)


class NonLocal2d(nn.Module):
    """
    Embedded-Gaussian non-local block with a residual connection and a zero-initialised output
    conv (identity at initialisation), as used by Libra R-CNN's BFP refine step.
    """

    def __init__(self, channels, inter_channels=None, attention="sdpa"):
        """
        Args:
            channels (int): input/output channels C.
            inter_channels (int or None): channels of theta/phi/g (default C, as in Libra R-CNN).
            attention (str): "sdpa" or "materialized" (see :func:`embedded_gaussian_attention`).
        """
        super().__init__()
        if attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention = {attention!r} is invalid: expected one of {ATTENTION_IMPLS}."
            )
        inter_channels = channels if inter_channels is None else inter_channels
        self.theta, self.phi, self.g = (Conv2d(channels, inter_channels, 1) for _ in range(3))
        self.conv_out = Conv2d(inter_channels, channels, kernel_size=1)  # W_z in the paper
        self.attention = attention
        for conv in (self.theta, self.phi, self.g):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x):
        """
        Args:
            x (Tensor): (N, C, H, W).

        Returns:
            Tensor: (N, C, H, W), ``x + W_z(softmax(theta phi^T) g)``.
        """
        n, _, h, w = x.shape
        # (N, C', H, W) -> (N, H*W, C') per projection
        q, k, v = (conv(x).flatten(2).transpose(1, 2) for conv in (self.theta, self.phi, self.g))
        y = embedded_gaussian_attention(q, k, v, impl=self.attention)
        y = y.transpose(1, 2).reshape(n, self.conv_out.in_channels, h, w)
        return x + self.conv_out(y)

    def extra_repr(self):
        return f"attention={self.attention!r}"
