"""Write real media files (video with optional audio track, audio in any common format).

Used by the synthetic world and by tests that need files in each container format.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

VIDEO_CODECS = {".mp4": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4", ".gif": "gif"}
AUDIO_CODECS = {".mp4": "aac", ".mkv": "aac", ".webm": "libopus", ".avi": "libmp3lame", ".mp3": "libmp3lame",
                ".m4a": "aac", ".ogg": "libopus"}


def write_video(path: str | Path, frames, fps: float = 25.0, audio: np.ndarray | None = None,
                sample_rate: int = 16_000, timestamps: list[float] | None = None, gop: int = 30) -> Path:
    """Encode `frames` (uint8 (H, W, 3) arrays, even sides) to `path`, codec by extension.

    timestamps: per-frame presentation times (s) for variable frame rate; default 1/fps apart.
    gop: frames between keyframes. audio: float32 mono waveform muxed as a second stream.
    """
    import av

    path = Path(path)
    codec = VIDEO_CODECS[path.suffix.lower()]
    height, width = frames[0].shape[:2]
    time_base = Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = width, height
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        if codec != "gif":
            stream.codec_context.gop_size = gop
        if codec == "libx264":  # x264's macroblock tree made the same frames encode to different bytes
            stream.options = {"x264-params": "mbtree=0"}
        stream.time_base = time_base
        audio_stream = None
        if audio is not None:
            audio_stream = container.add_stream(AUDIO_CODECS[path.suffix.lower()], rate=_audio_rate(path, sample_rate))
            audio_stream.layout = "mono"
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            t = timestamps[i] if timestamps is not None else i / fps
            frame.pts, frame.time_base = int(round(t / time_base)), time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if audio_stream is not None:
            _encode_audio(container, audio_stream, audio, sample_rate)
    return path


def write_audio(path: str | Path, waveform: np.ndarray, sample_rate: int = 16_000) -> Path:
    """Write mono float32 `waveform` to wav/flac (soundfile) or mp3/m4a/ogg (PyAV), by extension."""
    import av

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".wav", ".flac"):
        import soundfile

        soundfile.write(str(path), waveform, sample_rate)
        return path
    container_format = {".m4a": "mp4", ".ogg": "ogg", ".mp3": "mp3"}[suffix]
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(AUDIO_CODECS[suffix], rate=_audio_rate(path, sample_rate))
        stream.layout = "mono"
        _encode_audio(container, stream, waveform, sample_rate)
    return path


def _audio_rate(path: Path, sample_rate: int) -> int:
    return 48_000 if AUDIO_CODECS.get(path.suffix.lower()) == "libopus" else sample_rate


def _encode_audio(container, stream, waveform: np.ndarray, sample_rate: int) -> None:
    import av

    resampler = av.AudioResampler(format=stream.codec_context.format or "fltp", layout="mono", rate=stream.rate)
    frame = av.AudioFrame.from_ndarray(np.asarray(waveform, np.float32)[None, :], format="flt", layout="mono")
    frame.sample_rate = sample_rate
    for resampled in resampler.resample(frame) + resampler.resample(None):
        container.mux(stream.encode(resampled))
    container.mux(stream.encode(None))
