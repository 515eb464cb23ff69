"""Audio: decode any common file to 16-kHz mono, and Whisper log-mel features per window.

    waveform = load_audio("question.mp3")                  # float32 (samples,), 16 kHz
    features = AudioProcessor(num_mel_bins=128)(waveform)  # all windows, none dropped

The log-mel is the same computation as `transformers`' `WhisperFeatureExtractor` (periodic
Hann window, 400-point STFT, hop 160, Slaney mel filters, log10, 8-decade floor, (x+4)/4),
done in torch on all windows of a clip at once.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from omniforge.errors import EmptyMediaError, MediaTooLargeError, UnreadableMediaError, UnsupportedMediaError
from omniforge.processing.counts import HOP_LENGTH, SAMPLE_RATE, AudioGeometry
from omniforge.processing.source import media_source

N_FFT = 400
MAX_SECONDS = 4 * 3600
"""Longest audio accepted (seconds)."""


def load_audio(source, sample_rate: int = SAMPLE_RATE, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """Decode `source` (path or bytes: wav/flac/ogg via soundfile, mp3/m4a/... via PyAV) to mono.

    Channels are averaged; the rate is converted with a polyphase filter that removes what
    would alias. Returns float32 (samples,) at `sample_rate`. Raises a `MediaError` naming the file.
    """
    stream = media_source(source, "audio")
    try:
        waveform, rate = _decode_soundfile(stream, source, max_seconds)
    except MediaTooLargeError:
        raise
    except Exception:  # noqa: BLE001  (not a libsndfile format: let FFmpeg try)
        if isinstance(stream, io.BytesIO):
            stream.seek(0)
        waveform, rate = _decode_av(stream, source, max_seconds)
    if waveform.size == 0:
        raise EmptyMediaError(source, "audio has no samples")
    _check_seconds(source, waveform.shape[0] / rate, max_seconds)  # for a header that states no length, or a wrong one
    mono = waveform.mean(axis=1) if waveform.ndim == 2 else waveform
    if not np.isfinite(mono).all():
        raise UnreadableMediaError(source, "audio holds NaN or infinite samples")
    return resample(mono.astype(np.float32), rate, sample_rate)


def resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited rate conversion (polyphase FIR with a Kaiser window, scipy)."""
    if rate == target:
        return waveform.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), int(target))
    up, down = target // g, rate // g
    taps = _lowpass(up, down)
    if np.issubdtype(waveform.dtype, np.floating):
        taps = taps.astype(waveform.dtype)  # as resample_poly casts the filter it designs
    return resample_poly(waveform, up, down, window=taps).astype(np.float32)


@lru_cache(maxsize=8)
def _lowpass(up: int, down: int) -> np.ndarray:
    """The anti-aliasing FIR `resample_poly` would design for (up, down), designed once: for a
    second of speech at 22.05 kHz it cost as much as the filtering itself."""
    from scipy.signal import firwin

    rate = max(up, down)
    return firwin(20 * rate + 1, 1 / rate, window=("kaiser", 5.0))


def _check_seconds(source, seconds: float, max_seconds: float) -> None:
    if seconds > max_seconds:
        raise MediaTooLargeError(source, f"{seconds:.0f} s of audio exceeds the limit of {max_seconds:.0f} s")


def _decode_soundfile(stream, source, max_seconds: float) -> tuple[np.ndarray, int]:
    import soundfile

    with soundfile.SoundFile(stream) as sound:  # opened once: the header's length, then the samples
        _check_seconds(source, sound.frames / sound.samplerate, max_seconds)  # before decoding it all into memory
        return sound.read(dtype="float32", always_2d=True), sound.samplerate


def _decode_av(stream, source, max_seconds: float) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(stream) as container:
            if not container.streams.audio:
                raise UnsupportedMediaError(source, "no audio stream in the file")
            audio = container.streams.audio[0]
            seconds = _stated_seconds(container, audio)
            if seconds is not None:
                _check_seconds(source, seconds, max_seconds)  # before decoding it all into memory
            return decode_audio_stream(container, audio), SAMPLE_RATE
    except (UnsupportedMediaError, MediaTooLargeError):
        raise
    except av.error.InvalidDataError:
        raise UnsupportedMediaError(source, "not an audio format FFmpeg can decode") from None
    except (av.error.FFmpegError, ValueError) as e:
        raise UnreadableMediaError(source, f"corrupt or truncated audio ({e})") from None


def _stated_seconds(container, stream) -> float | None:
    """The length the container's header gives the audio stream (or the whole file); None if none."""
    import av

    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def decode_audio_stream(container, stream) -> np.ndarray:
    """All of an open PyAV audio stream as float32 mono 16 kHz (FFmpeg's band-limited resampler)."""
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks = []
    for frame in container.decode(stream):
        for out in resampler.resample(frame):
            chunks.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):
        chunks.append(out.to_ndarray().reshape(-1))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


@dataclass
class AudioFeatures:
    features: torch.Tensor
    """(windows, n_mels, window_frames) log-mel, each window zero-padded to full length."""
    valid_frames: torch.Tensor
    """(windows,) mel frames of each window that hold audio."""
    seconds: float
    """Length of the clip."""


class AudioProcessor:
    """Whisper log-mel features over consecutive fixed-length windows."""

    def __init__(self, num_mel_bins: int = 128, window_frames: int = 3000):
        from transformers.audio_utils import mel_filter_bank

        self.num_mel_bins, self.window_frames = num_mel_bins, window_frames
        filters = mel_filter_bank(num_frequency_bins=1 + N_FFT // 2, num_mel_filters=num_mel_bins, min_frequency=0.0,
                                  max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney",
                                  mel_scale="slaney")
        self.mel_filters = torch.from_numpy(filters.T.astype(np.float32))  # (n_mels, freq)
        self.window = torch.hann_window(N_FFT)

    def __call__(self, waveform: np.ndarray | torch.Tensor) -> AudioFeatures:
        """Features of every window of a 16-kHz mono clip; the last window is zero-padded."""
        audio = torch.as_tensor(waveform, dtype=torch.float32).reshape(-1)
        if audio.numel() == 0:
            raise EmptyMediaError("audio", "no samples")
        geometry = AudioGeometry(self.window_frames, stack=1)
        valid = geometry.window_lengths(audio.numel())
        span = self.window_frames * HOP_LENGTH
        padded = torch.zeros(len(valid) * span)
        padded[: audio.numel()] = audio
        longest = audio.numel() - (len(valid) - 1) * span  # samples in the last window
        features = self.log_mel(padded.view(len(valid), span), span if len(valid) > 1 else longest)
        return AudioFeatures(features, torch.tensor(valid), audio.numel() / SAMPLE_RATE)

    def log_mel(self, windows: torch.Tensor, audio_samples: int | None = None) -> torch.Tensor:
        """(W, samples) -> (W, n_mels, samples // 160): Whisper's normalised log-mel, per window.

        audio_samples: how many leading samples of any window may be non-zero. The STFT then
        stops where the frames see only zeros (their value is known: the 1e-10 floor), which
        for a short clip in a 30-s window skips most of the work. Same result either way.
        """
        span = windows.shape[1]
        frames = span // HOP_LENGTH
        if audio_samples is not None:  # frames past audio + n_fft see only zeros, even mirrored
            span = min(span, math.ceil((audio_samples + N_FFT) / HOP_LENGTH) * HOP_LENGTH)
        stft = torch.stft(windows[:, :span], N_FFT, HOP_LENGTH, window=self.window, return_complex=True)
        power = stft[..., :frames].abs() ** 2
        mel = (self.mel_filters @ power).clamp(min=1e-10).log10()
        if mel.shape[-1] < frames:
            mel = torch.nn.functional.pad(mel, (0, frames - mel.shape[-1]), value=-10.0)  # log10(1e-10)
        mel = torch.maximum(mel, mel.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (mel + 4.0) / 4.0
