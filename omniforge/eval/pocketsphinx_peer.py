"""A real ASR peer on the same audio: CMU PocketSphinx with the English model its wheel ships.

It is a general-purpose recogniser (US-English acoustic model, generic language model), so
it knows nothing of the synthetic world's vocabulary; it is the honest outside reference our
ASR WER is reported beside.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def _decoder():
    from pocketsphinx import Decoder

    return Decoder(samprate=16_000, loglevel="FATAL")


def transcribe(waveform: np.ndarray) -> str:
    """Lower-case transcript of float32 16-kHz mono audio."""
    pcm = (np.clip(waveform, -1, 1) * 32767).astype(np.int16)
    decoder = _decoder()
    decoder.start_utt()
    decoder.process_raw(pcm.tobytes(), full_utt=True)
    decoder.end_utt()
    hypothesis = decoder.hyp()
    return hypothesis.hypstr.lower() if hypothesis else ""


def available() -> bool:
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        return False
    return True
