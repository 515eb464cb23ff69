"""The adapter that maps encoder features into the LLM's embedding space."""

from __future__ import annotations

import torch
from torch import nn


class MLPAdapter(nn.Module):
    """[LayerNorm] -> `num_layers` linear layers with GELU between them -> [RMSNorm]: (..., in_dim) -> (..., out_dim).

    input_norm: LayerNorm over the encoder features first (InternVL's projector), so that the
        adapter sees the same scale whichever tower or layer the features come from.
    output_norm: an RMSNorm last, so that media tokens keep the scale of the text embeddings
        around them (`match_embeddings` sets its gain). Without it the adapter's output norm
        grows freely under Adam (measured 3 -> 25 against ~1 for text embeddings in the micro
        demo), and since the LLM's own RMSNorm divides by that norm, every update to the
        media path shrinks in effect as it grows.
    """

    def __init__(self, in_dim: int, out_dim: int, num_layers: int = 2, hidden_size: int | None = None,
                 input_norm: bool = False, output_norm: bool = False):
        super().__init__()
        hidden_size = hidden_size or out_dim
        dims = [in_dim] + [hidden_size] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(a, b))
        self.input_norm = nn.LayerNorm(in_dim) if input_norm else None
        self.layers = nn.Sequential(*layers)
        self.output_norm = nn.RMSNorm(out_dim) if output_norm else None

    def match_embeddings(self, embeddings: torch.Tensor) -> None:
        """Set the output gain to the root-mean-square of each dimension of `embeddings` (V, out_dim)."""
        if self.output_norm is not None:
            with torch.no_grad():
                self.output_norm.weight.copy_(embeddings.float().pow(2).mean(0).sqrt())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.input_norm is not None:
            features = self.input_norm(features)
        out = self.layers(features)
        return out if self.output_norm is None else self.output_norm(out)
