"""SDPA that computes packed rows sample by sample: attention cost sum(n_i^2), not L^2.

A packed row carries `cu_seq_lens_q` (cumulative sample lengths over the flattened batch, the
FlashAttention varlen convention). FlashAttention uses them directly on GPUs; PyTorch's SDPA
has no variable-length kernel, so with a block-diagonal mask it would still compute every
block of the L x L score matrix. This attention function runs causal SDPA on each sample's
span instead, and is plain `transformers` SDPA for everything else (padding masks, KV cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "omniforge_sdpa"
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
"""Keyword arguments a packed batch passes through the model to the attention function."""


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """query: (B, Hq, L, D); key, value: (B, Hkv, L, D). Returns (B, L, Hq, D) like transformers' SDPA."""
    if cu_seq_lens_q is None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise NotImplementedError(f"{NAME}: packed rows run plain causal attention per sample; this model's "
                                  "sliding-window or soft-capped attention needs padded batches (batch_size) "
                                  "or llm.attention: sdpa")
    batch, heads, length, dim = query.shape
    # (1, H, B·L, D): batch 1 and 4-D, which CPU SDPA runs with its flash kernel (2x the 3-D math path)
    q, k, v = (t.transpose(0, 1).reshape(1, t.shape[1], batch * length, dim) for t in (query, key, value))
    sizes = cu_seq_lens_q.diff().tolist()
    # one split and one cat: slicing each sample out (and writing it back) would make autograd
    # materialise a full-row gradient per sample and per tensor (a fifth of a packed step)
    out = torch.cat([F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling,
                                                    dropout_p=dropout if module.training else 0.0,
                                                    enable_gqa=heads != k.shape[1])
                     for qs, ks, vs in zip(*(t.split(sizes, dim=2) for t in (q, k, v)))], dim=2)
    return out.reshape(heads, batch, length, dim).permute(1, 2, 0, 3).contiguous(), None


def register() -> str:
    """Make `omniforge_sdpa` a `transformers` attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_attention)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
