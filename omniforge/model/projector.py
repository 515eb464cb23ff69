"""The adapter that maps encoder features into the LLM's embedding space."""

from __future__ import annotations

import torch
from torch import nn


class MLPAdapter(nn.Module):
    """`num_layers` linear layers with GELU between them: (..., in_dim) -> (..., out_dim).

    positions > 0 adds a learned embedding per index of the second-to-last axis, which must then
    have that length: (tiles, positions, in_dim) -> (tiles, positions, out_dim), each token
    tagged with where in its tile it lies. time_positions > 0 keeps that many learned vectors
    along a clip's timeline, which `timeline` reads.
    """

    def __init__(self, in_dim: int, out_dim: int, num_layers: int = 2, hidden_size: int | None = None,
                 positions: int = 0, time_positions: int = 0):
        super().__init__()
        # both start as no-ops: a checkpoint trained without them answers the same
        self.positions = nn.Parameter(torch.zeros(positions, out_dim)) if positions else None
        self.time_positions = nn.Parameter(torch.zeros(time_positions, out_dim)) if time_positions else None
        hidden_size = hidden_size or out_dim
        dims = [in_dim] + [hidden_size] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(a, b))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.layers(features)
        if self.positions is not None:
            if out.shape[-2] != len(self.positions):
                raise ValueError(f"MLPAdapter: {out.shape[-2]} tokens a tile, positions were sized for "
                                 f"{len(self.positions)}")
            out = out + self.positions
        return out

    def timeline(self, times: torch.Tensor) -> torch.Tensor:
        """(frames,) relative times in [0, 1] -> (frames, out_dim): the vector of each frame's
        share of the timeline (times clamped into it)."""
        if self.time_positions is None:
            raise ValueError("MLPAdapter.timeline: built without time_positions")
        slots = (times * len(self.time_positions)).long().clamp(0, len(self.time_positions) - 1)
        return self.time_positions[slots]
