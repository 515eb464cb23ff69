"""A toy dataset in seconds: rendered circles and pure tones, for tests and benchmarks.

Far smaller than the synthetic world (`omniforge synth`): four colours, two pitches, sums.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def shape_image(colour: str, size: int = 96):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=COLOURS[colour])
    return image


def tone(freq: float, seconds: float = 1.5) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_toy_dataset(root, records: int = 40) -> Path:
    """A JSONL file of image / audio / text / image+audio questions with real media files."""
    from omniforge.data.media_writers import write_audio

    root = Path(root)
    (root / "media").mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS)
    for colour in colours:
        shape_image(colour).save(root / "media" / f"{colour}.png")
    for pitch, freq in (("high", 2400.0), ("low", 180.0)):
        write_audio(root / "media" / f"{pitch}.wav", tone(freq))
    with (root / "data.jsonl").open("w") as f:
        for i in range(records):
            colour, pitch = colours[(i // 4) % 4], ("high", "low")[(i // 4) % 2]
            kind = i % 4
            if kind == 0:
                record = {"messages": [{"role": "user", "content": "<image>\nColour?"},
                                       {"role": "assistant", "content": colour}], "images": [f"media/{colour}.png"]}
            elif kind == 1:
                record = {"messages": [{"role": "user", "content": "<audio>\nPitch?"},
                                       {"role": "assistant", "content": pitch}], "audios": [f"media/{pitch}.wav"]}
            elif kind == 2:
                record = {"messages": [{"role": "user", "content": f"{i} plus one?"},
                                       {"role": "assistant", "content": str(i + 1)}]}
            else:
                record = {"messages": [{"role": "user", "content": "<image><audio>\nBoth?"},
                                       {"role": "assistant", "content": f"{colour} {pitch}"}],
                          "images": [f"media/{colour}.png"], "audios": [f"media/{pitch}.wav"]}
            f.write(json.dumps(record) + "\n")
    return root / "data.jsonl"
