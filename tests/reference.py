"""Reference helpers shared by the tests, written independently of the package."""

import math

import torch


def naive_attention(q, k, v, mask=None):
    """Per-batch, per-head loop: the definition of attention, softmax(q·kᵀ/√d)·v, with a key padding mask."""
    B, H, Tq, d = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            s = q[b, h] @ k[b, h].T / math.sqrt(d)
            if mask is not None:
                s = s.masked_fill(~mask[b][None, :], float("-inf"))
            out[b, h] = torch.softmax(s, -1) @ v[b, h]
    return out


def saved_values(fn) -> int:
    """Number of values autograd saves for backward while fn() runs."""
    n = [0]

    def pack(x):
        n[0] += x.numel()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return n[0]
