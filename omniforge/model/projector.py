"""The adapter that maps encoder features into the LLM's embedding space."""

from __future__ import annotations

import torch
from torch import nn


class MLPAdapter(nn.Module):
    """`num_layers` linear layers with GELU between them: (..., in_dim) -> (..., out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, num_layers: int = 2, hidden_size: int | None = None):
        super().__init__()
        hidden_size = hidden_size or out_dim
        dims = [in_dim] + [hidden_size] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(a, b))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)
