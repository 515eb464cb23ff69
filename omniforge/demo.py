"""`omniforge demo`: the whole model path on a tiny omni model, in seconds, on a CPU.

Build the tiny preset (SigLIP + Whisper + Qwen2 parts, random init) -> encode a mixed batch of
real media (rendered shapes, synthetic tones, text) through the chat processor -> train on it
-> save a checkpoint, reload it, check the logits are identical -> stream an answer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from omniforge.config import load_config
from omniforge.model.generate import GenerationConfig, stream
from omniforge.model.omni import OmniModel
from omniforge.processing.chat import OmniProcessor

TINY_MODEL = Path(__file__).resolve().parents[1] / "recipes" / "models" / "tiny.yaml"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def shape_image(colour: str, size: int = 96):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=COLOURS[colour])
    return image


def tone(freq: float, seconds: float = 1.5) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def demo_conversations():
    """Eight mixed samples: image questions, audio questions, image+audio, text."""
    samples = [([{"role": "user", "content": "<image>\nWhat colour is the shape?"},
                 {"role": "assistant", "content": colour}], {"image": [shape_image(colour)]})
               for colour in COLOURS]
    samples += [([{"role": "user", "content": "<audio>\nIs the tone high or low?"},
                  {"role": "assistant", "content": pitch}], {"audio": [tone(freq)]})
                for pitch, freq in (("high", 2400.0), ("low", 180.0))]
    samples.append(([{"role": "user", "content": "<image><audio>\nColour, then pitch?"},
                     {"role": "assistant", "content": "blue, low"}],
                    {"image": [shape_image("blue")], "audio": [tone(180.0)]}))
    samples.append(([{"role": "user", "content": "What is two plus three?"},
                     {"role": "assistant", "content": "five"}], {}))
    return samples


def write_tiny_dataset(root, records: int = 40) -> Path:
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


def run_demo(out: Path, steps: int = 60) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = OmniModel.from_config(load_config(TINY_MODEL))
    processor = OmniProcessor.from_model(model)
    print("tiny omni model")
    for name in ("vision", "vision_adapter", "audio", "audio_adapter", "llm"):
        print(f"  {name:15s} {sum(p.numel() for p in getattr(model, name).parameters()) / 1e6:6.2f} M params")
    encoded = [processor.encode(messages, media) for messages, media in demo_conversations()]
    batch = processor.collate(encoded)
    labelled = int((batch["labels"] != -100).sum())
    print(f"batch: {len(encoded)} samples, {batch['input_ids'].numel()} tokens ({labelled} labelled), "
          f"{len(batch['pixel_values'])} image tiles, {len(batch['audio_valid_frames'])} audio windows")

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step == 1 or step % 10 == 0 or step == steps:
            print(f"  step {step:3d}  loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start
    print(f"trained {steps} steps in {elapsed:.1f} s ({elapsed / steps * 1000:.0f} ms a step of 8 samples)")

    model.eval()
    model.save_pretrained(out / "checkpoint")
    reloaded = OmniModel.from_pretrained(out / "checkpoint").eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        same = torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
    print(f"saved to {out / 'checkpoint'}; reloaded logits identical: {same}")

    for messages, media in demo_conversations()[2:5]:
        prompt = processor.encode(messages[:1], media, add_generation_prompt=True)
        question = messages[0]["content"].split("\n")[-1]
        print(f"Q: {question}  ->  A: ", end="", flush=True)
        inputs = processor.collate([prompt], padding_side="left")
        inputs.pop("labels")
        for deltas in stream(reloaded, config=GenerationConfig(max_new_tokens=16), **inputs):
            print(deltas[0], end="", flush=True)
        print(f"   (expected: {messages[1]['content']})")
