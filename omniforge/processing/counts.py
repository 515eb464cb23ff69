"""How many feature vectors each input becomes: the one formula the processor and the model share.

The processor expands every placeholder to exactly these counts; the model computes its
features with the same functions and refuses a batch whose placeholders disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SAMPLE_RATE = 16_000
"""Audio sample rate the Whisper encoder expects (Hz)."""
HOP_LENGTH = 160
"""Samples between log-mel frames: 100 frames per second."""
ENCODER_STRIDE = 2
"""Whisper's second convolution halves the frame rate: 50 encoder frames per second."""


def tokens_per_tile(tile_size: int, patch_size: int, pool: int) -> int:
    """Vision tokens per tile: the patch grid, bilinearly pooled by `pool` per side.

    448-px tile, 14-px patches, pool 2: grid 32 -> 16, 256 tokens.
    """
    grid = tile_size // patch_size
    return pooled_grid(grid, pool) ** 2


def pooled_grid(grid: int, pool: int) -> int:
    """Side of the patch grid after pooling by `pool` (rounded up, so no patch is dropped)."""
    return math.ceil(grid / pool)


@dataclass(frozen=True)
class AudioGeometry:
    """Where audio tokens come from: fixed-size encoder windows, stacked encoder frames."""

    window_frames: int
    """Log-mel frames per encoder window (3000 = 30 s for Whisper)."""
    stack: int
    """Consecutive encoder frames concatenated into one token (4: 50 -> 12.5 tokens/s)."""

    @classmethod
    def from_whisper(cls, max_source_positions: int, tokens_per_second: float) -> "AudioGeometry":
        """A Whisper encoder's geometry: its window is `max_source_positions` encoder frames (1500:
        30 s), each ENCODER_STRIDE mel frames, stacked to `tokens_per_second` tokens a second."""
        encoder_frames_per_second = SAMPLE_RATE / HOP_LENGTH / ENCODER_STRIDE
        return cls(max_source_positions * ENCODER_STRIDE, stack=round(encoder_frames_per_second / tokens_per_second))

    @property
    def window_samples(self) -> int:
        return self.window_frames * HOP_LENGTH

    @property
    def window_seconds(self) -> float:
        return self.window_samples / SAMPLE_RATE

    def window_lengths(self, num_samples: int) -> list[int]:
        """Valid mel frames in each window of a clip of `num_samples` samples (16 kHz).

        Long audio is split into consecutive windows; the last one is partial. Nothing is dropped.
        """
        frames = math.ceil(num_samples / HOP_LENGTH)
        full, rest = divmod(frames, self.window_frames)
        return [self.window_frames] * full + ([rest] if rest else [])

    def tokens_for_frames(self, valid_frames: int) -> int:
        """Tokens one window yields when its first `valid_frames` mel frames hold audio."""
        return math.ceil(math.ceil(valid_frames / ENCODER_STRIDE) / self.stack)

    def tokens(self, num_samples: int) -> int:
        """Tokens for a clip of `num_samples` samples (16 kHz), over all its windows."""
        return sum(self.tokens_for_frames(n) for n in self.window_lengths(num_samples))
