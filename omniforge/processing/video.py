"""Video: choose frame times by duration (VITA's rule) and decode only those frames (PyAV).

    video = load_video("clip.mp4", FrameSampling(), with_audio=True)
    video.frames       # PIL RGB images, one per sampled time
    video.timestamps   # seconds of each frame
    video.audio        # float32 16-kHz mono track, or None

A demux-only pass (packets, no decoding) finds the keyframes; decoding then seeks to the
keyframe before each wanted time when that skips frames, and decodes forward to it, so a long
clip costs a few groups of pictures, not every frame. Frame times come from each frame's own
timestamp, so variable frame rate is handled; a missing duration comes from the packets.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from omniforge.errors import EmptyMediaError, UnreadableMediaError, UnsupportedMediaError
from omniforge.processing.audio import decode_audio_stream
from omniforge.processing.source import media_source


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
    """Decode the sampled frames of `source` (path or bytes; mp4, webm, mkv, avi, gif, ...).

    A stream that cannot seek or carries no timing (a raw H.264 elementary stream, say) is
    decoded front to back instead, its frame times counted from the frame rate.
    """
    import av

    sampling = sampling or FrameSampling()
    stream_source = media_source(source, "video")
    try:
        with av.open(stream_source) as container:
            if not container.streams.video:
                raise UnsupportedMediaError(source, "no video stream in the file")
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"  # frame threading re-primes its pipeline at every seek
            try:
                start, duration, keyframes = _scan(container, stream)
            except OSError:  # not seekable: av.error.PermissionError / UnsupportedOperation
                start, duration = 0.0, 0.0
            if duration > 0:
                frames, stamps = _decode_at(container, stream, [start + t for t in sampling.times(duration)],
                                            keyframes)
                audio = None
                if with_audio and container.streams.audio:
                    container.seek(0)
                    audio = decode_audio_stream(container, container.streams.audio[0])
        if duration <= 0:
            frames, stamps, duration = _decode_in_order(stream_source, sampling)  # times from 0
            start, audio = 0.0, None
        if not frames:
            raise EmptyMediaError(source, "video has no decodable frames")
    except (UnsupportedMediaError, EmptyMediaError):
        raise
    except av.error.InvalidDataError:
        raise UnsupportedMediaError(source, "not a video format FFmpeg can decode") from None
    except (av.error.FFmpegError, ValueError, IndexError, ZeroDivisionError) as e:
        raise UnreadableMediaError(source, f"corrupt or truncated video ({e})") from None
    return Video(frames, [t - start for t in stamps], duration, audio)


def _decode_in_order(stream_source, sampling: FrameSampling) -> tuple[list, list[float], float]:
    """Two front-to-back passes for untimed or unseekable streams: count the frames, then keep
    the sampled ones (nothing but the kept frames is held in memory)."""
    import av

    def frames():
        if hasattr(stream_source, "seek"):
            stream_source.seek(0)
        with av.open(stream_source) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            for index, frame in enumerate(container.decode(stream)):
                yield index, rate, frame

    total, rate = 0, 25.0
    for index, rate, _ in frames():
        total = index + 1
    if total == 0:
        return [], [], 0.0
    duration = total / rate
    wanted = [min(total - 1, int(t * rate)) for t in sampling.times(duration)]
    kept = {index: frame.to_image() for index, _, frame in frames() if index in set(wanted)}
    return [kept[i] for i in wanted], [i / rate for i in wanted], duration


def _scan(container, stream) -> tuple[float, float, list[float]]:
    """Start time, duration (s) and keyframe times, from one demux pass (no decoding).

    The duration comes from stream metadata, else the container's, else the packets.
    """
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else None
    keyframes, first, last_end = [], None, 0.0
    for packet in container.demux(stream):
        if packet.pts is None:
            continue
        t = float(packet.pts * stream.time_base)
        first = t if first is None else min(first, t)
        last_end = max(last_end, t + float((packet.duration or 0) * stream.time_base))
        if packet.is_keyframe:
            keyframes.append(t)
    container.seek(0)
    start = start if start is not None else (first or 0.0)
    if stream.duration and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1_000_000
    else:
        duration = max(0.0, last_end - start)
    return start, duration, sorted(keyframes)


def _decode_at(container, stream, times: list[float], keyframes: list[float]) -> tuple[list, list[float]]:
    """For each wanted time, the first frame shown at or after it (the last frame if none).

    Seeks only when a keyframe lies between the last decoded frame and the wanted time;
    otherwise decoding forward is cheaper than starting a new group of pictures.
    """
    frames, stamps = [], []
    position, iterator, last = None, None, None
    half = _half_frame(stream)
    for target in times:
        at = bisect.bisect_right(keyframes, target)
        keyframe = keyframes[at - 1] if at else None
        if iterator is None or (keyframe is not None and keyframe > position):
            container.seek(int((keyframe or 0.0) / stream.time_base), stream=stream, backward=True, any_frame=False)
            iterator = container.decode(stream)
        chosen = None
        for frame in iterator:
            if frame.time is None:
                continue
            position, last = frame.time, frame
            if frame.time + half >= target:
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
