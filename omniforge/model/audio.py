"""Audio encoder: the Whisper encoder, windowed, with consecutive frames stacked into tokens."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from omniforge.config import AudioConfig
from omniforge.errors import ConfigError
from omniforge.model.loading import build_tower, hf_config
from omniforge.processing.counts import ENCODER_STRIDE, HOP_LENGTH, SAMPLE_RATE, AudioGeometry

FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH


class AudioEncoder(nn.Module):
    """Log-mel windows -> audio tokens, only from the part of each window that holds audio.

    forward(features: (W, n_mels, window_frames), valid_frames: (W,)) -> (sum of tokens, stack·D)
    where W counts windows over the whole batch, in placeholder order, and the token count of
    window w is `geometry.tokens_for_frames(valid_frames[w])`.

    trim_seconds: run the encoder on each window's audio only, rounded up to a multiple of this
    many seconds, instead of on the whole zero-padded window (None). Whisper was trained on
    whole 30-s windows, so a real checkpoint keeps None; a tower pretrained trimmed (the micro
    stand-in) saves the work on padding (60 % of its windows' frames in the demo's speech).
    """

    def __init__(self, encoder: nn.Module, tokens_per_second: float = 12.5,
                 ctc_head: tuple[torch.Tensor, torch.Tensor] | None = None, trim_seconds: float | None = None):
        super().__init__()
        config = encoder.config
        self.encoder = encoder
        # the encoder's CTC read-out, (V+1, D) weight and (V+1,) bias: buffers, never trained,
        # since they define what the mix in `ctc_embeddings` means
        self.register_buffer("ctc_weight", None if ctc_head is None else ctc_head[0])
        self.register_buffer("ctc_bias", None if ctc_head is None else ctc_head[1])
        self.num_mel_bins = int(config.num_mel_bins)
        self.geometry = AudioGeometry.from_whisper(int(config.max_source_positions), tokens_per_second)
        self.hidden_size = int(config.d_model) * self.geometry.stack
        # trimmed lengths are whole tokens: a multiple of ENCODER_STRIDE · stack mel frames
        step = ENCODER_STRIDE * self.geometry.stack
        self.trim_frames = None if trim_seconds is None else \
            min(max(step, round(trim_seconds * FRAMES_PER_SECOND / step) * step), self.geometry.window_frames)

    @classmethod
    def from_config(cls, config: AudioConfig, dtype: torch.dtype, weights: bool = True) -> "AudioEncoder":
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        whisper_config = hf_config(config.path, config.arch, "audio")
        if whisper_config.model_type != "whisper":
            raise ConfigError(f"audio: expected a Whisper model, got model_type={whisper_config.model_type!r}")
        pretrained = getattr(whisper_config, "pretrained_trim_seconds", None)  # written by `omniforge encoders`
        if pretrained is not None and pretrained != config.trim_seconds:
            raise ConfigError(f"audio.trim_seconds: the tower in {config.path} was pretrained on windows trimmed to "
                              f"{pretrained} s; set audio.trim_seconds: {pretrained} (got {config.trim_seconds})")
        encoder = build_tower(WhisperEncoder, whisper_config, config.path, dtype, "audio", weights)
        head = load_ctc_head(config.path, whisper_config.d_model, dtype, weights) if config.ctc_posteriors else None
        return cls(encoder, config.tokens_per_second, head, config.trim_seconds)

    def forward(self, features: torch.Tensor, valid_frames: torch.Tensor) -> torch.Tensor:
        hidden = self.encode(features, valid_frames)
        w, t, d = hidden.shape
        stack = self.geometry.stack
        pad = -t % stack
        if pad:
            hidden = torch.cat([hidden, hidden.new_zeros(w, pad, d)], dim=1)
        tokens = hidden.reshape(w, -1, stack * d)  # (W, tokens per full window, stack·D)
        counts = [self.geometry.tokens_for_frames(int(n)) for n in valid_frames]
        return torch.cat([tokens[i, :n] for i, n in enumerate(counts)])

    def encode(self, features: torch.Tensor, valid_frames: torch.Tensor) -> torch.Tensor:
        """(W, n_mels, window_frames) -> (W, window_frames/2, D) encoder frames. Trimmed windows
        run in one batch per trimmed length; their frames past it are zeros."""
        if self.trim_frames is None:
            return self.encoder(input_features=features).last_hidden_state
        lengths = (valid_frames.clamp(min=1) + self.trim_frames - 1) // self.trim_frames * self.trim_frames
        lengths = lengths.clamp(max=self.geometry.window_frames)
        hidden = features.new_zeros(len(features), self.geometry.window_frames // ENCODER_STRIDE,
                                    self.encoder.config.d_model)
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero().squeeze(1)
            hidden[rows, : length // ENCODER_STRIDE] = _whisper_encoder_forward(self.encoder, features[rows, :, :length])
        return hidden

    def ctc_logits(self, frames: torch.Tensor) -> torch.Tensor:
        """(..., D) encoder frames -> (..., V + 1) logits of the CTC head the tower was pretrained
        with (the blank last)."""
        if self.ctc_weight is None:
            raise ValueError("AudioEncoder: no CTC head (audio.ctc_posteriors is off)")
        return nn.functional.linear(frames, self.ctc_weight, self.ctc_bias)

    def ctc_embeddings(self, tokens: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """tokens: (N, stack·D) from `forward`; embeddings: (V', H) the LLM's input embeddings,
        V' >= the CTC vocabulary. -> (N, H): per token, the sum over its frames of
        p(token | frame) · embedding, blank left out (a frame of silence adds nothing)."""
        frames = tokens.view(len(tokens), self.geometry.stack, -1)  # (N, stack, D)
        probs = self.ctc_logits(frames).softmax(-1)  # (N, stack, V + 1)
        blank = probs.shape[-1] - 1
        if len(embeddings) < blank:
            raise ValueError(f"AudioEncoder.ctc_embeddings: the CTC head reads {blank} tokens, the LLM embeds only "
                             f"{len(embeddings)}: the head must be trained over the LLM's tokenizer")
        return (probs[..., :blank] @ embeddings[:blank].to(probs.dtype)).sum(1)


def _whisper_encoder_forward(encoder: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """`WhisperEncoder.forward` on (N, n_mels, frames) shorter than its window, which the Hugging Face
    forward refuses: the same layers, with the first frames/2 position embeddings. -> (N, frames/2, D)."""
    hidden = nn.functional.gelu(encoder.conv2(nn.functional.gelu(encoder.conv1(features)))).transpose(1, 2)
    hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]]
    hidden = nn.functional.dropout(hidden, p=encoder.dropout, training=encoder.training)
    for layer in encoder.layers:
        hidden = layer(hidden, None)
    return encoder.layer_norm(hidden)


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
