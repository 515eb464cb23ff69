"""Media items -> encoder inputs and their exact token cost, for one model configuration.

`MediaProcessor` needs no weights: tile size, patch size, pooling and the audio window come
from the config and, where present, the towers' `config.json`. So budgets can be sized
(`omniforge tokens`) before any checkpoint is on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omniforge.config import OmniConfig
from omniforge.errors import ConfigError, OmniforgeError
from omniforge.processing.audio import AudioProcessor, load_audio
from omniforge.processing.counts import AudioGeometry, tokens_per_tile
from omniforge.processing.image import ImageProcessor, load_image
from omniforge.processing.video import FrameSampling, Video, load_video

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
VIDEO_EXTS = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v"})
AUDIO_EXTS = frozenset({".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus", ".aac"})


def media_kind(file: str | Path, default: str | None = None) -> str:
    """"image", "video" or "audio" by extension (an animated GIF is a video); an unknown
    extension gives `default`, or an error listing the known ones when there is none."""
    file = Path(file)
    ext = file.suffix.lower()
    if ext == ".gif":
        from PIL import Image

        try:
            with Image.open(file) as image:
                return "video" if getattr(image, "n_frames", 1) > 1 else "image"
        except Exception:  # noqa: BLE001  (unreadable: the image loader reports it properly)
            return "image"
    for kind, exts in (("image", IMAGE_EXTS), ("video", VIDEO_EXTS), ("audio", AUDIO_EXTS)):
        if ext in exts:
            return kind
    if default is not None:
        return default
    raise OmniforgeError(f"{file}: unknown media extension {ext!r} "
                         f"(images {sorted(IMAGE_EXTS)}, videos {sorted(VIDEO_EXTS)}, audio {sorted(AUDIO_EXTS)})")


WHISPER_SOURCE_POSITIONS = 1500
"""Encoder frames in Whisper's 30-s window, used when no audio tower config is at hand."""


@dataclass
class MediaItem:
    """One processed image, video or audio clip: encoder input, token count, and what was done."""

    modality: str
    """"image", "video" or "audio"."""
    tokens: int
    """Feature vectors the encoders will produce, hence placeholder tokens in the text."""
    pixel_values: torch.Tensor | None = None
    """(tiles or frames, 3, T, T) for images and videos."""
    audio_features: torch.Tensor | None = None
    """(windows, n_mels, window_frames) for audio."""
    audio_valid_frames: torch.Tensor | None = None
    """(windows,) for audio."""
    frame_times: torch.Tensor | None = None
    """(frames,) for videos: each frame's time as a share of the clip, in [0, 1]."""
    info: dict[str, Any] = field(default_factory=dict)
    """What the model sees: tile grid, frame times, audio windows."""


class MediaProcessor:
    """Turns images, videos and audio into encoder inputs, with their token counts."""

    def __init__(self, image: ImageProcessor | None, tokens_per_tile: int | None, sampling: FrameSampling,
                 audio: AudioProcessor | None, audio_geometry: AudioGeometry | None):
        self.image, self.tokens_per_tile, self.sampling = image, tokens_per_tile, sampling
        self.audio, self.audio_geometry = audio, audio_geometry

    @classmethod
    def from_config(cls, config: OmniConfig) -> "MediaProcessor":
        image = per_tile = audio = geometry = None
        if config.vision is not None:
            v = config.vision
            tower = _tower_config(v.path, v.arch, "vision")
            tower = getattr(tower, "vision_config", tower) if tower is not None else None
            patch = v.patch_size or (tower.patch_size if tower is not None else None)
            if patch is None:
                raise ConfigError("vision.patch_size: needed when the vision tower's folder is not on disk")
            per_tile = tokens_per_tile(v.tile_size, patch, v.pool)
            image = ImageProcessor.from_tower_folder(v.path if tower is not None else None, v.tile_size,
                                                     v.min_tiles, v.max_tiles)
        if config.audio is not None:
            whisper = _tower_config(config.audio.path, config.audio.arch, "audio")
            positions = whisper.max_source_positions if whisper is not None else WHISPER_SOURCE_POSITIONS
            bins = whisper.num_mel_bins if whisper is not None else 128
            geometry = AudioGeometry.from_whisper(positions, config.audio.tokens_per_second)
            audio = AudioProcessor(bins, geometry.window_frames)
        return cls(image, per_tile, config.video, audio, geometry)

    # ------------------------------------------------------------------ one item each

    def image_item(self, source, max_tiles: int | None = None) -> MediaItem:
        """An image (path, bytes or PIL image) tiled for the vision tower."""
        self._need(self.image, "image", "vision")
        picture = load_image(source)
        tiled = self.image(picture, max_tiles)
        info = {"size": list(picture.size), "grid": list(tiled.grid), "tiles": tiled.num_tiles,
                "thumbnail": tiled.thumbnail}
        return MediaItem("image", tiled.num_tiles * self.tokens_per_tile, pixel_values=tiled.pixel_values, info=info)

    def video_item(self, source) -> MediaItem:
        """A video (path, bytes or decoded `Video`): sampled frames, one tile each."""
        self._need(self.image, "video", "vision")
        video = source if isinstance(source, Video) else load_video(source, self.sampling)
        frames = torch.cat([self.image(frame, max_tiles=1).pixel_values for frame in video.frames])
        info = {"duration": round(video.duration, 3), "frames": len(video.frames),
                "timestamps": [round(t, 3) for t in video.timestamps]}
        shares = torch.tensor(video.timestamps) / video.duration if video.duration > 0 else torch.zeros(len(video.frames))
        return MediaItem("video", len(video.frames) * self.tokens_per_tile, pixel_values=frames,
                         frame_times=shares.float().clamp(0, 1), info=info)

    def audio_item(self, source) -> MediaItem:
        """Audio (path, bytes or 16-kHz float waveform): log-mel over every window."""
        self._need(self.audio, "audio", "audio")
        waveform = source if isinstance(source, np.ndarray) else load_audio(source)
        if waveform.ndim != 1:
            raise ValueError(f"audio: expected a mono waveform of shape (samples,) at 16 kHz, got shape "
                             f"{waveform.shape}; average the channels first")
        features = self.audio(waveform)
        tokens = self.audio_geometry.tokens(waveform.shape[0])
        info = {"seconds": round(features.seconds, 3), "windows": len(features.valid_frames),
                "window_seconds": self.audio_geometry.window_seconds}
        return MediaItem("audio", tokens, audio_features=features.features,
                         audio_valid_frames=features.valid_frames, info=info)

    def item(self, modality: str, source) -> MediaItem:
        return {"image": self.image_item, "video": self.video_item, "audio": self.audio_item}[modality](source)

    @staticmethod
    def _need(part, modality: str, key: str) -> None:
        if part is None:
            raise ConfigError(f"{key}: the model has no {key} tower (config.{key} is null), so it cannot take {modality}")


def _tower_config(path: str | None, arch: dict | None, key: str):
    """The tower's HF config from its folder or `arch`; None when the folder is not on disk."""
    from omniforge.model.loading import hf_config

    if path is not None and not (Path(path) / "config.json").is_file():
        return None
    return hf_config(path, arch, key)
