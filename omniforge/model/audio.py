"""Audio encoder: the Whisper encoder, windowed, with consecutive frames stacked into tokens."""

from __future__ import annotations

from pathlib import Path

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

    def __init__(self, encoder: nn.Module, tokens_per_second: float = 12.5,
                 ctc_head: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        config = encoder.config
        self.encoder = encoder
        # the encoder's CTC read-out, (V+1, D) weight and (V+1,) bias: buffers, never trained,
        # since they define what the mix in `ctc_embeddings` means
        self.register_buffer("ctc_weight", None if ctc_head is None else ctc_head[0])
        self.register_buffer("ctc_bias", None if ctc_head is None else ctc_head[1])
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
        head = load_ctc_head(config.path, whisper_config.d_model, dtype, weights) if config.ctc_posteriors else None
        return cls(encoder, config.tokens_per_second, head)

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

    def ctc_embeddings(self, tokens: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """tokens: (N, stack·D) from `forward`; embeddings: (V', H) the LLM's input embeddings,
        V' >= the CTC vocabulary. -> (N, H): per token, the sum over its frames of
        p(token | frame) · embedding, blank left out (a frame of silence adds nothing)."""
        if self.ctc_weight is None:
            raise ValueError("AudioEncoder.ctc_embeddings: no CTC head (audio.ctc_posteriors is off)")
        blank = len(self.ctc_weight) - 1
        if len(embeddings) < blank:
            raise ValueError(f"AudioEncoder.ctc_embeddings: the CTC head reads {blank} tokens, the LLM embeds only "
                             f"{len(embeddings)}: the head must be trained over the LLM's tokenizer")
        frames = tokens.view(len(tokens), self.geometry.stack, -1)  # (N, stack, D)
        probs = nn.functional.linear(frames, self.ctc_weight, self.ctc_bias).softmax(-1)[..., :blank]  # (N, stack, V)
        return (probs @ embeddings[:blank].to(probs.dtype)).sum(1)


CTC_HEAD_FILE = "ctc_head.safetensors"
"""The encoder's CTC head over the LLM's vocabulary (`weight` (V+1, D), `bias`; blank last)."""


def load_ctc_head(folder: str | None, hidden: int, dtype: torch.dtype,
                  weights: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the CTC head stored beside an audio tower (see `CTC_HEAD_FILE`)."""
    path = Path(folder or "") / CTC_HEAD_FILE
    if folder is None or not path.is_file():
        raise ConfigError(f"audio.ctc_posteriors: {path} not found; `omniforge encoders` writes it beside a "
                          f"CTC-pretrained tower")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as stored:
        shape = stored.get_slice("weight").get_shape()
        if len(shape) != 2 or shape[1] != hidden:
            raise ConfigError(f"{path}: weight has shape {shape}, expected (vocabulary + 1, {hidden})")
        if not weights:
            return torch.empty(shape, dtype=dtype), torch.empty(shape[0], dtype=dtype)
        return stored.get_tensor("weight").to(dtype), stored.get_tensor("bias").to(dtype)


def save_ctc_head(folder: Path, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Write a CTC head beside an audio tower, as `load_ctc_head` reads it."""
    from safetensors.torch import save_file

    save_file({"weight": weight.detach().contiguous(), "bias": bias.detach().contiguous()}, Path(folder) / CTC_HEAD_FILE)
