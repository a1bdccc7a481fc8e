"""The embedded-Gaussian non-local block, the "refine" step of Libra R-CNN's Balanced Feature Pyramid.

Non-local block (Wang et al., "Non-local Neural Networks", 2018), embedded-Gaussian form, as Libra
R-CNN (Pang et al., 2019) uses it on the balanced semantic feature::

    theta = W_theta x,  phi = W_phi x,  g = W_g x          (1x1 convs, C -> C channels)
    y_i   = sum_j softmax_j(theta_i . phi_j) g_j             (softmax over the H*W positions,
                                                             NO 1/sqrt(d) scaling)
    z     = x + W_z y                                        (W_z: 1x1 conv initialised to zero,
                                                             so the block starts as identity)

The attention is (H*W) x (H*W). It is never materialised on the default path:
:func:`embedded_gaussian_attention` calls ``torch.nn.functional.scaled_dot_product_attention``
with ``scale=1.0`` when PyTorch dispatches that call to a fused kernel (flash attention on CPU in
torch >= 2.2, flash / memory-efficient attention on CUDA), whose memory grows linearly with H*W
in the forward and the backward pass. Where SDPA would fall back to its "math" path (which does
materialise the matrix: e.g. flash SDPA disabled with ``torch.backends.cuda.enable_flash_sdp(False)``,
which also governs the CPU kernel), it runs a chunked implementation instead: query blocks of at
most ``chunk_elements`` attention entries each, wrapped in activation checkpointing when autograd
records, so that neither the forward nor the backward pass holds more than one block.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend
from torch.utils.checkpoint import checkpoint

from detectron2.layers import Conv2d

__all__ = ["NonLocal2d", "embedded_gaussian_attention", "ATTENTION_IMPLS"]

#: Implementations of :func:`embedded_gaussian_attention`.
ATTENTION_IMPLS = ("auto", "sdpa", "chunked", "materialized")

# Largest number of attention entries (batch x query-block x keys) one chunk holds: 2**22 float32
# entries = 16 MiB.
_DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _attend(query, key, value):
    """softmax(Q K^T) V over the last two dims, materialising the (Lq x Lk) matrix."""
    return torch.softmax(query @ key.transpose(-1, -2), dim=-1) @ value


def sdpa_is_fused(query, key, value):
    """
    Whether ``scaled_dot_product_attention(query, key, value, scale=1.0)`` dispatches to a fused
    (non-materialising) kernel for these tensors on this machine.

    Uses PyTorch's own backend selection (``torch._fused_sdp_choice``); if that private function
    is missing or fails, answers False (the caller then takes the always-linear chunked path).

    Args:
        query, key, value (Tensor): (N, 1, L, C) tensors as they would be passed to SDPA.

    Returns:
        bool
    """
    try:
        choice = torch._fused_sdp_choice(query, key, value, None, 0.0, False, scale=1.0)
    except Exception:  # pragma: no cover - depends on the torch build
        return False
    return int(choice) not in (int(SDPBackend.MATH), -1)


def _chunked_attention(query, key, value, chunk_elements):
    n, lq, _ = query.shape
    lk = key.shape[1]
    rows = max(1, chunk_elements // max(1, n * lk))
    if rows >= lq:
        blocks = [(0, lq)]
    else:
        blocks = [(s, min(lq, s + rows)) for s in range(0, lq, rows)]
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    outs = []
    for start, end in blocks:
        q = query[:, start:end]
        if recording and len(blocks) > 1:
            # Recompute the block's softmax in backward instead of saving it: linear memory.
            outs.append(checkpoint(_attend, q, key, value, use_reentrant=False))
        else:
            outs.append(_attend(q, key, value))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def embedded_gaussian_attention(query, key, value, impl="auto", chunk_elements=None):
    """
    ``softmax(query @ key^T) @ value`` with the softmax over keys and no 1/sqrt(d) scaling.

    Args:
        query (Tensor): (N, Lq, C).
        key (Tensor): (N, Lk, C).
        value (Tensor): (N, Lk, Cv).
        impl (str): "auto" (default): SDPA with ``scale=1.0`` where it dispatches to a fused kernel,
            else "chunked". "sdpa": always SDPA (may take its materialising math path).
            "chunked": query blocks with activation checkpointing; memory linear in Lk.
            "materialized": the plain (Lq x Lk) matrix (the reference; quadratic memory).
        chunk_elements (int or None): attention entries per block for "chunked"
            (default 2**22).

    Returns:
        Tensor: (N, Lq, Cv).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}; got {impl!r}.")
    if query.numel() == 0 or key.shape[1] == 0:
        return query.new_zeros(query.shape[0], query.shape[1], value.shape[-1])
    if impl == "materialized":
        return _attend(query, key, value)
    if chunk_elements is None:
        chunk_elements = _DEFAULT_CHUNK_ELEMENTS
    if impl in ("auto", "sdpa"):
        # SDPA's fused CPU kernel needs 4-D inputs with a contiguous last dim.
        q, k, v = (t.unsqueeze(1).contiguous() for t in (query, key, value))
        if impl == "sdpa" or sdpa_is_fused(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, scale=1.0).squeeze(1)
    return _chunked_attention(query, key, value, chunk_elements)


class NonLocal2d(nn.Module):
    """
    Embedded-Gaussian non-local block with a residual connection and a zero-initialised output
    conv (identity at initialisation), as used by Libra R-CNN's BFP refine step.
    """

    def __init__(self, channels, inter_channels=None, attention_impl="auto", chunk_elements=None):
        """
        Args:
            channels (int): input/output channels C.
            inter_channels (int or None): channels of theta/phi/g (default C, as in Libra R-CNN).
            attention_impl (str): see :func:`embedded_gaussian_attention`.
            chunk_elements (int or None): see :func:`embedded_gaussian_attention`.
        """
        super().__init__()
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"NonLocal2d attention_impl must be one of {ATTENTION_IMPLS}; got {attention_impl!r}."
            )
        inter_channels = channels if inter_channels is None else inter_channels
        self.theta = Conv2d(channels, inter_channels, kernel_size=1)
        self.phi = Conv2d(channels, inter_channels, kernel_size=1)
        self.g = Conv2d(channels, inter_channels, kernel_size=1)
        self.conv_out = Conv2d(inter_channels, channels, kernel_size=1)  # W_z in the paper
        self.attention_impl = attention_impl
        self.chunk_elements = chunk_elements
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

        def positions(t):  # (N, C', H, W) -> (N, H*W, C')
            return t.flatten(2).transpose(1, 2)

        y = embedded_gaussian_attention(
            positions(self.theta(x)),
            positions(self.phi(x)),
            positions(self.g(x)),
            impl=self.attention_impl,
            chunk_elements=self.chunk_elements,
        )
        y = y.transpose(1, 2).reshape(n, self.conv_out.in_channels, h, w)
        return x + self.conv_out(y)

    def extra_repr(self):
        return f"attention_impl={self.attention_impl!r}"
