"""Video: choose frame times by duration (VITA's rule) and decode only those frames (PyAV).

    video = load_video("clip.mp4", FrameSampling(), with_audio=True)
    video.frames       # PIL RGB images, one per sampled time
    video.timestamps   # seconds of each frame
    video.audio        # float32 16-kHz mono track, or None

Decoding seeks to the keyframe before each wanted time and decodes forward to it, so a long
clip costs a few GOPs, not every frame. Frame times come from each frame's own timestamp, so
variable frame rate is handled; a missing duration is found by a demux-only scan.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omniforge.errors import EmptyMediaError, UnreadableMediaError, UnsupportedMediaError
from omniforge.processing.audio import decode_audio_stream


@dataclass
class FrameSampling:
    """How many frames a clip gives, by duration (VITA: <4 s: 4; 4-16 s: 1 fps; >16 s: 16)."""

    short_seconds: float = 4.0
    """Clips shorter than this give `short_frames` frames, spread uniformly."""
    short_frames: int = 4
    long_seconds: float = 16.0
    """Clips longer than this give `long_frames` frames, spread uniformly; in between, 1 per second."""
    long_frames: int = 16
    fps: float | None = None
    """Fixed-rate mode: this many frames per second (at most `long_frames`), instead of the rule."""

    def validate(self, key: str) -> None:
        from omniforge.errors import ConfigError

        if not (0 < self.short_seconds <= self.long_seconds) or min(self.short_frames, self.long_frames) < 1:
            raise ConfigError(f"{key}: need 0 < short_seconds <= long_seconds and frame counts >= 1")
        if self.fps is not None and self.fps <= 0:
            raise ConfigError(f"{key}.fps: must be > 0")

    def times(self, duration: float) -> list[float]:
        """Sample times (seconds), each the centre of an equal share of the clip."""
        if self.fps is not None:
            count = min(self.long_frames, max(1, round(duration * self.fps)))
        elif duration < self.short_seconds:
            count = self.short_frames
        elif duration <= self.long_seconds:
            count = max(1, round(duration))
        else:
            count = self.long_frames
        return [(i + 0.5) * duration / count for i in range(count)]


@dataclass
class Video:
    frames: list
    """PIL RGB images at `timestamps`."""
    timestamps: list[float]
    duration: float
    audio: np.ndarray | None = None
    """The audio track, float32 mono 16 kHz (when asked for and present)."""


def load_video(source, sampling: FrameSampling | None = None, with_audio: bool = False) -> Video:
    """Decode the sampled frames of `source` (path or bytes; mp4, webm, mkv, avi, gif, ...)."""
    import av

    sampling = sampling or FrameSampling()
    try:
        data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    except OSError as e:
        raise UnreadableMediaError(source, f"cannot read video file ({e.strerror or e})") from None
    if not data:
        raise EmptyMediaError(source, "empty video file (0 bytes)")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise UnsupportedMediaError(source, "no video stream in the file")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            start, duration = _start_and_duration(container, stream)
            if duration <= 0:
                raise EmptyMediaError(source, "video has no frames")
            times = sampling.times(duration)
            frames, stamps = _decode_at(container, stream, [start + t for t in times])
            if not frames:
                raise EmptyMediaError(source, "video has no decodable frames")
            audio = None
            if with_audio and container.streams.audio:
                container.seek(0)
                audio = decode_audio_stream(container, container.streams.audio[0])
    except (UnsupportedMediaError, EmptyMediaError):
        raise
    except av.error.InvalidDataError:
        raise UnsupportedMediaError(source, "not a video format FFmpeg can decode") from None
    except (av.error.FFmpegError, ValueError, IndexError, ZeroDivisionError) as e:
        raise UnreadableMediaError(source, f"corrupt or truncated video ({e})") from None
    return Video(frames, [s - start for s in stamps], duration, audio)


def _start_and_duration(container, stream) -> tuple[float, float]:
    """Start time and duration (s): stream metadata, else container, else a demux-only scan."""
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return start, float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return start, container.duration / 1_000_000
    last_end, first = 0.0, None
    for packet in container.demux(stream):  # packets only, nothing decoded
        if packet.pts is None:
            continue
        t = float(packet.pts * stream.time_base)
        first = t if first is None else min(first, t)
        last_end = max(last_end, t + float((packet.duration or 0) * stream.time_base))
    container.seek(0)
    first = first or 0.0
    return first, max(0.0, last_end - first)


SEEK_GAP = 2.0
"""Seek only when the next wanted frame is this many seconds past the last decoded one."""


def _decode_at(container, stream, times: list[float]) -> tuple[list, list[float]]:
    """For each wanted time, the first frame shown at or after it (the last frame if none)."""
    frames, stamps = [], []
    position = None  # time of the last decoded frame; None: decoder not positioned
    iterator = None
    last = None
    for target in times:
        if position is None or target - position > SEEK_GAP:
            container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
            iterator = container.decode(stream)
        chosen = None
        for frame in iterator:
            if frame.time is None:
                continue
            position, last = frame.time, frame
            if frame.time + _half_frame(stream) >= target:
                chosen = frame
                break
        chosen = chosen or last
        if chosen is None:
            break
        frames.append(chosen.to_image())
        stamps.append(float(chosen.time))
    return frames, stamps


def _half_frame(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return 0.5 / float(rate) if rate else 0.0
