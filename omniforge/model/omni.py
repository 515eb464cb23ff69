"""OmniModel: pretrained encoders and a causal LM composed into one omni-modal model.

    image tiles / video frames -> VisionEncoder -> vision_adapter --+
    log-mel windows            -> AudioEncoder  -> audio_adapter  --+-> scattered into the
    text tokens                -> LLM token embeddings -------------+   placeholder positions -> LLM

Parts are injected (`OmniModel(config, llm, tokenizer, vision=..., audio=...)`), or built
from local Hugging Face folders with `OmniModel.from_config`, or reloaded from an omniforge
checkpoint with `OmniModel.from_pretrained`.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from omniforge.config import OmniConfig, load_config, save_config
from omniforge.errors import CheckpointError, ConfigError, PlaceholderCountError
from omniforge.files import atomic_folder
from omniforge.model.attention import NAME as ATTENTION
from omniforge.model.attention import PACKED_KEYS
from omniforge.model.audio import AudioEncoder, save_ctc_head
from omniforge.model.loading import load_llm
from omniforge.model.projector import MLPAdapter
from omniforge.model.tokenizer import load_tokenizer
from omniforge.model.vision import VisionEncoder, resize_token_grid

CONFIG_FILE = "config.yaml"
ADAPTERS_FILE = "adapters.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"


class OmniModel(nn.Module):
    """An LLM that reads images, video and audio through encoders and adapters.

    Components (each its own trainable unit): `vision` (tower + pooling), `vision_adapter`,
    `audio` (Whisper encoder + frame stacking), `audio_adapter`, `llm`.
    """

    def __init__(self, config: OmniConfig, llm: nn.Module, tokenizer,
                 vision: VisionEncoder | None = None, audio: AudioEncoder | None = None,
                 vision_adapter: nn.Module | None = None, audio_adapter: nn.Module | None = None):
        super().__init__()
        self.config, self.llm, self.tokenizer = config, llm, tokenizer
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer))
        hidden = llm.get_input_embeddings().embedding_dim
        dtype = llm.get_input_embeddings().weight.dtype
        self.vision, self.audio = vision, audio
        self.vision_adapter = _adapter(vision, vision_adapter, config.vision_adapter, hidden, dtype)
        self.audio_adapter = _adapter(audio, audio_adapter, config.audio_adapter, hidden, dtype)
        if audio is not None and audio.ctc_weight is not None and audio_adapter is None:
            _zero_output(self.audio_adapter)  # the CTC mix carries the audio at first; the MLP adds the rest
        self.run_all_encoders = False
        """Run every encoder on every batch (a dummy input when a batch has none of its media), so
        that data-parallel ranks with different media mixes all use every trainable parameter."""
        vocab = tokenizer.get_vocab()
        self.token_ids = {name: vocab[getattr(config.tokens, name)]
                          for name in ("image", "video", "audio", "state_text", "state_speech", "state_background")}

    # ------------------------------------------------------------------ building and saving

    @classmethod
    def from_config(cls, config: OmniConfig, weights: bool = True) -> "OmniModel":
        """Build every part from its local Hugging Face folder (or randomly, from `arch`).

        weights=False reads only configs: under `torch.device("meta")` that sizes a 7B model
        without memory or time.
        """
        dtype = getattr(torch, config.llm.dtype)
        tokenizer = load_tokenizer(config.llm, config.tokens)
        llm = load_llm(config.llm.path, config.llm.arch, dtype, config.llm.attention, weights)
        vision = VisionEncoder.from_config(config.vision, dtype, weights) if config.vision else None
        audio = AudioEncoder.from_config(config.audio, dtype, weights) if config.audio else None
        return cls(config, llm, tokenizer, vision=vision, audio=audio)

    @classmethod
    def from_pretrained(cls, folder: str | Path, overrides: list[str] = ()) -> "OmniModel":
        """Reload a folder written by `save_pretrained` (weights, config and tokenizer)."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise CheckpointError(f"{folder}: not an omniforge checkpoint (no {CONFIG_FILE})")
        config = load_config(folder / CONFIG_FILE, overrides)
        config = _with_part_folders(config, folder)
        model = cls.from_config(config)
        from safetensors.torch import load_file

        adapters = load_file(folder / ADAPTERS_FILE) if (folder / ADAPTERS_FILE).is_file() else {}
        state = model.state_dict()
        expected = {k for k in state if k.split(".")[0].endswith("_adapter")}
        if set(adapters) != expected:
            raise CheckpointError(f"{folder / ADAPTERS_FILE}: holds {sorted(adapters)[:4]}..., "
                                  f"the configured model expects {sorted(expected)[:4]}...")
        key = "vision_adapter.positions"
        if key in adapters and adapters[key].shape != model.vision_adapter.positions.shape:
            adapters[key] = _resize_grid(adapters[key], len(model.vision_adapter.positions))
        for name, tensor in sorted(adapters.items()):
            if tensor.shape != state[name].shape:
                raise CheckpointError(f"{folder / ADAPTERS_FILE}: tensor {name} has shape {tuple(tensor.shape)}, "
                                      f"the configured model expects {tuple(state[name].shape)}")
        model.load_state_dict(adapters, strict=False)
        return model

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        extra_files: dict[str, str] | None = None) -> None:
        """Write weights (safetensors, one HF folder per part), config and tokenizer, atomically.

        Everything is written beside the folder, then renamed in (`omniforge.files.atomic_folder`):
        a crash mid-write leaves the previous export as it was.
        `llm/` is a plain Hugging Face causal-LM folder (with the extended tokenizer).
        state_dict: the full weights to write instead of this module's own (e.g. gathered
        from FSDP shards).
        extra_files: {name: text} written into the folder with the rest (e.g. a stage's record).
        """
        from safetensors.torch import save_file

        state = self.state_dict() if state_dict is None else state_dict
        with atomic_folder(folder) as tmp:
            self.llm.save_pretrained(tmp / "llm", state_dict=_part(state, "llm."))
            self.tokenizer.save_pretrained(tmp / "llm")
            for name, module, part, prefix in (("vision", self.vision, self.config.vision, "vision.tower."),
                                               ("audio", self.audio, self.config.audio, "audio.encoder.")):
                if module is None:
                    continue
                tower = module.tower if name == "vision" else module.encoder
                tower.save_pretrained(tmp / name, state_dict=_part(state, prefix))
                if name == "audio" and module.ctc_weight is not None:
                    save_ctc_head(tmp / name, state["audio.ctc_weight"], state["audio.ctc_bias"])
                if part.path and (Path(part.path) / PREPROCESSOR_FILE).is_file():
                    shutil.copy(Path(part.path) / PREPROCESSOR_FILE, tmp / name / PREPROCESSOR_FILE)
            adapters = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.split(".")[0].endswith("_adapter")}
            save_file(adapters, tmp / ADAPTERS_FILE)
            save_config(_with_part_folders(self.config, None), tmp / CONFIG_FILE)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)

    # ------------------------------------------------------------------ forward

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              pixel_values_videos: torch.Tensor | None = None, video_frame_times: torch.Tensor | None = None,
              audio_features: torch.Tensor | None = None, audio_valid_frames: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Token embeddings with every placeholder replaced by its encoder feature.

        input_ids: (B, L) with placeholders already expanded to the feature counts.
        pixel_values: (image tiles, 3, T, T); pixel_values_videos: (frames, 3, T, T), each in
        placeholder order over the flattened batch, with video_frame_times: (frames,) each frame's
        time as a share of its clip (read when the vision adapter has time positions).
        audio_features: (windows, n_mels, frames) with audio_valid_frames: (windows,). Returns (B, L, H).
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        image, video = self._vision_features(pixel_values, pixel_values_videos, video_frame_times)
        audio = None
        if audio_features is not None:
            if self.audio is None:
                raise ValueError("audio_features given but the model has no audio tower (config.audio is null)")
            if audio_valid_frames is None:
                raise ValueError("audio_features needs audio_valid_frames: (windows,) valid mel frames per window")
            audio = self._audio_tokens(audio_features.to(embeds.dtype), audio_valid_frames)
        for modality, features in (("image", image), ("video", video), ("audio", audio)):
            embeds = self._scatter(embeds, input_ids, modality, features)
        if self.run_all_encoders:
            vision_reached = video is not None or (image is not None and not self._has_timeline())
            embeds = embeds + self._unused_encoders_term(vision_reached=vision_reached, audio_used=audio is not None)
        return embeds

    def _has_timeline(self) -> bool:
        return getattr(self.vision_adapter, "time_positions", None) is not None

    def _unused_encoders_term(self, vision_reached: bool, audio_used: bool) -> torch.Tensor:
        """0 x (features of a dummy input) for each encoder whose parameters the batch did not all
        reach: a zero that puts them in the graph, so every rank reduces the same gradients. The
        vision dummy is a one-frame video, which reaches every vision parameter (images alone miss
        the adapter's timeline)."""
        dtype = self.llm.get_input_embeddings().weight.dtype
        zero = torch.zeros((), dtype=dtype, device=self.device)
        if self.vision is not None and not vision_reached:
            frame = torch.zeros(1, 3, self.vision.tile_size, self.vision.tile_size, dtype=dtype, device=self.device)
            _, video = self._vision_features(None, frame, torch.zeros(1, device=self.device))
            zero = zero + 0.0 * video.sum()
        if self.audio is not None and not audio_used:
            window = torch.zeros(1, self.audio.num_mel_bins, self.audio.geometry.window_frames, dtype=dtype,
                                 device=self.device)
            valid = torch.tensor([self.audio.geometry.window_frames], device=self.device)
            zero = zero + 0.0 * self._audio_tokens(window, valid).sum()
        return zero

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                num_items_in_batch: float | None = None, **inputs):
        """Logits (B, L, V) and, given labels (B, L; -100 = no loss), the next-token loss.

        Packed rows pass position_ids restarting at 0 per sample and no attention_mask: the
        LLM then attends within each sample only. num_items_in_batch: divide the summed token
        losses by this (the labelled tokens of a whole optimizer step) instead of taking the
        mean. inputs: the media keyword arguments of `embed`, and for packed rows the sample
        boundaries (`cu_seq_lens_q` ..., see `omniforge.model.attention`). Returns the LLM's
        `CausalLMOutputWithPast`.
        """
        extra = {key: inputs.pop(key) for key in PACKED_KEYS if key in inputs}
        if num_items_in_batch is not None:
            extra["num_items_in_batch"] = num_items_in_batch
        embeds = self.embed(input_ids, **inputs)
        if attention_mask is None and "cu_seq_lens_q" in extra and self.llm.config._attn_implementation == ATTENTION:
            # packed rows, which omniforge_sdpa splits at cu_seq_lens itself: with no mask, transformers
            # would build the (L, L) block-diagonal one from position_ids, never read (3 % of a 1b step);
            # an all-ones mask is one it skips
            attention_mask = torch.ones_like(input_ids)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                        labels=labels, use_cache=False, **extra)

    def _audio_tokens(self, features: torch.Tensor, valid_frames: torch.Tensor) -> torch.Tensor:
        """(windows, n_mels, frames) log-mel -> (audio tokens, H): the adapter's output, plus the
        CTC-posterior mix of the LLM's input embeddings where the tower has a CTC head."""
        tokens = self.audio(features, valid_frames)
        adapted = self.audio_adapter(tokens)
        if self.audio.ctc_weight is None:
            return adapted
        return adapted + self.audio.ctc_embeddings(tokens, self.llm.get_input_embeddings().weight)

    def last_audio_ctc(self, input_ids: torch.Tensor, audio_features: torch.Tensor,
                       audio_valid_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The audio tower's CTC read-out of each row's last audio (its last run of placeholders).

        input_ids: (B, L) with placeholders expanded; audio_features, audio_valid_frames: as for
        `embed`. Returns (B, T, C + 1) per-frame log-probabilities over the tokenizer, the blank
        last, zero-padded past each row's frames, and (B,) frame counts (0: a row without audio).
        """
        if self.audio is None or self.audio.ctc_weight is None:
            raise ValueError("last_audio_ctc needs an audio tower with a CTC head (audio.ctc_posteriors)")
        tokens = self.audio(audio_features.to(self.audio.ctc_weight.dtype), audio_valid_frames)
        frames = tokens.view(len(tokens), self.audio.geometry.stack, -1)
        log_probs = self.audio.ctc_logits(frames).float().log_softmax(-1)  # (audio tokens, stack, C + 1)
        placeholders = input_ids == self.token_ids["audio"]
        index = placeholders.flatten().cumsum(0).view_as(input_ids) - 1  # each placeholder's audio token
        rows = []
        for row, found in zip(index, placeholders):
            positions = found.nonzero().flatten()
            if not len(positions):
                rows.append(log_probs[:0].flatten(0, 1))
                continue
            breaks = (positions.diff() > 1).nonzero().flatten()
            start = int(breaks[-1]) + 1 if len(breaks) else 0  # where the last run begins
            rows.append(log_probs[row[positions[start:]]].flatten(0, 1))
        lengths = torch.tensor([len(r) for r in rows], device=log_probs.device)
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths

    def _vision_features(self, pixel_values, pixel_values_videos, video_frame_times):
        """Images and video frames go through the tower in one call, then split again; each
        frame's tokens get its time's vector where the adapter keeps a timeline."""
        batches = [p for p in (pixel_values, pixel_values_videos) if p is not None]
        if not batches:
            return None, None
        if self.vision is None:
            raise ValueError("pixel values given but the model has no vision tower (config.vision is null)")
        dtype = self.llm.get_input_embeddings().weight.dtype
        features = self.vision_adapter(self.vision(torch.cat(batches).to(dtype)))  # (tiles, tokens, H)
        n_images = 0 if pixel_values is None else len(pixel_values)
        image = features[:n_images].flatten(0, 1) if pixel_values is not None else None
        video = None
        if pixel_values_videos is not None:
            video = features[n_images:]  # (frames, tokens, H)
            if self._has_timeline():
                if video_frame_times is None or len(video_frame_times) != len(video):
                    raise ValueError(f"the vision adapter has time positions: video_frame_times must give each of the "
                                     f"{len(video)} frames its time (processor output)")
                video = video + self.vision_adapter.timeline(video_frame_times.to(video.device))[:, None]
            video = video.flatten(0, 1)
        return image, video

    def _scatter(self, embeds, input_ids, modality: str, features: torch.Tensor | None):
        mask = input_ids == self.token_ids[modality]
        placeholders = int(mask.sum())
        produced = 0 if features is None else features.shape[0]
        if placeholders != produced:
            raise PlaceholderCountError(modality, expected=produced, got=placeholders)
        if not produced:
            return embeds
        return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device


def _adapter(encoder, adapter, config, hidden, dtype):
    if encoder is None or adapter is not None:
        return adapter
    is_vision = isinstance(encoder, VisionEncoder)
    for key, value in (("tile_positions", config.tile_positions), ("time_positions", config.time_positions)):
        if value and not is_vision:
            raise ConfigError(f"audio_adapter.{key}: tiles and frames are vision notions; set it on vision_adapter")
    positions = encoder.tokens_per_tile if config.tile_positions else 0
    return MLPAdapter(encoder.hidden_size, hidden, config.num_layers, config.hidden_size, positions,
                      config.time_positions).to(dtype)


def _zero_output(adapter: nn.Module) -> None:
    """Zero the adapter's last linear layer, so it adds nothing until trained."""
    last = [m for m in adapter.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def _resize_grid(positions: torch.Tensor, tokens: int) -> torch.Tensor:
    """(side², H) per-token position vectors of a square grid -> (tokens, H), bilinearly, as ViTs
    resize position embeddings: a checkpoint stays loadable with another pooling or tile size."""
    old, new = math.isqrt(len(positions)), math.isqrt(tokens)
    if old * old != len(positions) or new * new != tokens:
        raise CheckpointError(f"vision_adapter.positions: cannot resize {len(positions)} positions to {tokens}; "
                              "both must be square grids")
    return resize_token_grid(positions[None].float(), new)[0].to(positions.dtype).contiguous()


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _with_part_folders(config: OmniConfig, folder: Path | None) -> OmniConfig:
    """The config with each part pointing at its subfolder of a checkpoint (relative when None)."""
    def at(name: str) -> str:
        return name if folder is None else str(folder / name)

    llm = replace(config.llm, path=at("llm"), arch=None, tokenizer=None)
    vision = config.vision and replace(config.vision, path=at("vision"), arch=None)
    audio = config.audio and replace(config.audio, path=at("audio"), arch=None)
    return replace(config, llm=llm, vision=vision, audio=audio)

