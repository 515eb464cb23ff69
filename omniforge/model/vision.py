"""Vision encoder: a Hugging Face vision transformer plus pooling of its patch grid."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from omniforge.config import VisionConfig
from omniforge.errors import ConfigError
from omniforge.model.loading import build_tower, hf_config
from omniforge.processing.counts import pooled_grid, tokens_per_tile


class VisionEncoder(nn.Module):
    """Tiles -> pooled patch features.

    forward(pixel_values: (N, 3, T, T)) -> (N, tokens_per_tile, D), where T = `tile_size`
    and D is the tower's hidden size. Position embeddings are interpolated when T differs
    from the tower's native image size; a class token (CLIP) is dropped.
    """

    def __init__(self, tower: nn.Module, tile_size: int, pool: int = 2, feature_layer: int = -1):
        super().__init__()
        config = tower.config
        self.tower = tower
        self.patch_size = int(config.patch_size)
        self.hidden_size = int(config.hidden_size)
        self.tile_size, self.pool, self.feature_layer = tile_size, pool, feature_layer
        self.grid = tile_size // self.patch_size
        self.tokens_per_tile = tokens_per_tile(tile_size, self.patch_size, pool)
        self.interpolate = tile_size != int(config.image_size)
        if self.interpolate and "interpolate_pos_encoding" not in inspect.signature(tower.forward).parameters:
            raise ConfigError(f"vision.tile_size: {type(tower).__name__} cannot interpolate position embeddings; "
                              f"use its native size {config.image_size}")

    @classmethod
    def from_config(cls, config: VisionConfig, dtype: torch.dtype, weights: bool = True) -> "VisionEncoder":
        tower_config = hf_config(config.path, config.arch, "vision")
        tower_config = getattr(tower_config, "vision_config", tower_config)  # full SigLIP / CLIP
        tower = build_tower(None, tower_config, config.path, dtype, "vision", weights)
        if config.patch_size is not None and config.patch_size != tower_config.patch_size:
            raise ConfigError(f"vision.patch_size: set to {config.patch_size} but the tower uses "
                              f"{tower_config.patch_size}-px patches")
        return cls(tower, config.tile_size, config.pool, config.feature_layer)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        want_hidden = self.feature_layer != -1
        out = self.tower(pixel_values=pixel_values, interpolate_pos_encoding=self.interpolate,
                         output_hidden_states=want_hidden)
        features = out.hidden_states[self.feature_layer] if want_hidden else out.last_hidden_state
        features = features[:, -self.grid * self.grid:]  # drops a leading class token when there is one
        return self.pool_grid(features)

    def pool_grid(self, features: torch.Tensor) -> torch.Tensor:
        """(N, grid², D) -> (N, ceil(grid/pool)², D): every patch counts towards the token over it.

        pool 2 interpolates bilinearly, which on an even grid is the mean of each 2x2 block (the
        weights are all 1/2), as checkpoints were trained. From 3 on bilinear would read only the one
        or two rows and columns nearest each sample point and skip the rest, so larger pools average
        each (about) pool x pool block instead.
        """
        if self.pool == 1:
            return features
        side = pooled_grid(self.grid, self.pool)
        if self.pool == 2:
            return resize_token_grid(features, side)
        n, _, d = features.shape
        grid = features.transpose(1, 2).reshape(n, d, self.grid, self.grid)
        return F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)


def resize_token_grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(N, g², D) tokens of a square g x g grid, row-major -> (N, side², D), bilinearly."""
    n, count, d = tokens.shape
    g = math.isqrt(count)
    grid = tokens.transpose(1, 2).reshape(n, d, g, g)
    resized = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    return resized.flatten(2).transpose(1, 2)
