"""Audio encoder: the Whisper encoder, windowed, with consecutive frames stacked into tokens."""

from __future__ import annotations

import torch
from torch import nn

from omniforge.config import AudioConfig
from omniforge.errors import ConfigError
from omniforge.model.loading import build_tower, hf_config
from omniforge.processing.counts import ENCODER_STRIDE, AudioGeometry


class AudioEncoder(nn.Module):
    """Log-mel windows -> audio tokens, only from the part of each window that holds audio.

    forward(features: (W, n_mels, window_frames), valid_frames: (W,)) -> (sum of tokens, stack·D)
    where W counts windows over the whole batch, in placeholder order, and the token count of
    window w is `geometry.tokens_for_frames(valid_frames[w])`.
    """

    def __init__(self, encoder: nn.Module, tokens_per_second: float = 12.5):
        super().__init__()
        config = encoder.config
        self.encoder = encoder
        self.num_mel_bins = int(config.num_mel_bins)
        self.geometry = AudioGeometry(window_frames=int(config.max_source_positions) * ENCODER_STRIDE,
                                      stack=round(50 / tokens_per_second))
        self.hidden_size = int(config.d_model) * self.geometry.stack

    @classmethod
    def from_config(cls, config: AudioConfig, dtype: torch.dtype, weights: bool = True) -> "AudioEncoder":
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        whisper_config = hf_config(config.path, config.arch, "audio")
        if whisper_config.model_type != "whisper":
            raise ConfigError(f"audio: expected a Whisper model, got model_type={whisper_config.model_type!r}")
        encoder = build_tower(WhisperEncoder, whisper_config, config.path, dtype, "audio", weights)
        return cls(encoder, config.tokens_per_second)

    def forward(self, features: torch.Tensor, valid_frames: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_features=features).last_hidden_state  # (W, window_frames/2, D)
        w, t, d = hidden.shape
        stack = self.geometry.stack
        pad = -t % stack
        if pad:
            hidden = torch.cat([hidden, hidden.new_zeros(w, pad, d)], dim=1)
        tokens = hidden.reshape(w, -1, stack * d)  # (W, tokens per full window, stack·D)
        counts = [self.geometry.tokens_for_frames(int(n)) for n in valid_frames]
        return torch.cat([tokens[i, :n] for i, n in enumerate(counts)])
