"""Training throughput on the tiny preset: packed vs padded batches of the same data, in one run.

    python bench/train_throughput.py        # ~1 minute on a 2-core CPU

Prints real (non-padding) tokens/s with packing and with padded batches that hold the same
samples, the padding waste of each, and the achieved FLOP/s of a training step (counted by
torch's FlopCounterMode) as a fraction of a plain fp32 matmul's FLOP/s measured in the same run,
packed steps under bf16 autocast (`train.precision: bf16`) against fp32, and the time of a whole
step (batch building included) with batches built inline and by a prefetch thread; and the micro
Whisper stand-in's forward + backward on whole zero-padded windows against windows trimmed to
their audio (`audio.trim_seconds`).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import omniforge  # noqa: F401
from omniforge.config import load_config
from omniforge.data.dataset import SampleStream, open_mixture
from omniforge.data.packing import PackedBatches, PaddedBatches, Prefetch
from omniforge.data.synthetic.toy import write_toy_dataset
from omniforge.model.omni import OmniModel
from omniforge.processing.chat import OmniProcessor
from omniforge.train.recipe import DatasetSpec

TINY_MODEL = Path(__file__).resolve().parents[1] / "recipes" / "models" / "tiny.yaml"
BUDGET = 2048
STEPS = 12


def train_steps(model, batches, steps, with_batching: bool = False, bf16: bool = False) -> tuple[float, int, int]:
    """Seconds, real tokens and capacity over `steps` optimizer steps (first two not timed);
    with_batching: the seconds include getting each batch (building it, or waiting for a prefetch);
    bf16: the forward under bf16 autocast, as the training loop runs `train.precision: bf16`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds = tokens = capacity = 0
    for step in range(steps + 2):
        start = time.perf_counter()
        batch = next(batches)
        if not with_batching:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch.inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            seconds += time.perf_counter() - start
            tokens += batch.tokens
            capacity += batch.capacity
    return seconds, tokens, capacity


def matmul_flops_per_second(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def step_flops(model, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(**batch.inputs).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def audio_window_seconds(trim_seconds: float | None, repeats: int = 6) -> float:
    """Seconds for forward + backward of the micro Whisper stand-in (recipes/micro_encoders.yaml)
    over 32 four-second windows holding 0.8-2.4 s of speech, as the demo's utterances do."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from omniforge.model.audio import AudioEncoder
    from omniforge.model.loading import hf_config
    from omniforge.train.encoders import load_encoder_recipe

    torch.manual_seed(0)
    encoder = AudioEncoder(WhisperEncoder(hf_config(None, load_encoder_recipe().audio.arch, "audio")),
                           trim_seconds=trim_seconds).train()
    window = encoder.geometry.window_frames
    features, valid = torch.randn(32, encoder.num_mel_bins, window), torch.randint(80, 240, (32,))
    for i in range(repeats + 2):
        if i == 2:
            start = time.perf_counter()
        encoder.encode(features, valid).sum().backward()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    torch.manual_seed(0)
    model = OmniModel.from_config(load_config(TINY_MODEL)).train()
    processor = OmniProcessor.from_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_toy_dataset(Path(tmp), records=200)
        mixture = open_mixture([DatasetSpec(str(data))], seed=0)

        def packed_rows() -> PackedBatches:  # the stream from its start, so every measurement sees the same batches
            return PackedBatches(SampleStream(mixture, processor), processor, BUDGET)

        probe = packed_rows()
        per_pack = round(sum(next(probe).samples for _ in range(8)) / 8)
        padded = PaddedBatches(SampleStream(mixture, processor), processor, per_pack)
        packed_s, packed_tokens, packed_capacity = train_steps(model, packed_rows(), STEPS)
        padded_s, padded_tokens, padded_capacity = train_steps(model, padded, STEPS)
        bf16_s, bf16_tokens, _ = train_steps(model, packed_rows(), STEPS, bf16=True)
        flops = step_flops(model, next(packed_rows()))
        inline, prefetch = packed_rows(), Prefetch(packed_rows())
        steps_with = {name: train_steps(model, batches, STEPS, with_batching=True)[0] / STEPS
                      for name, batches in (("inline", inline), ("prefetch thread", prefetch))}
        prefetch.close()
    packed_rate, padded_rate = packed_tokens / packed_s, padded_tokens / padded_s
    peak = matmul_flops_per_second()
    achieved = flops / (packed_s / STEPS)
    params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tiny preset ({params / 1e6:.2f} M params), "
          f"image/audio/text/image+audio samples")
    print(f"packed ({BUDGET} tokens a row): {packed_rate:,.0f} real tokens/s, padding waste "
          f"{1 - packed_tokens / packed_capacity:.1%}")
    print(f"padded ({per_pack} samples a batch, the same samples a step): {padded_rate:,.0f} real tokens/s, "
          f"padding waste {1 - padded_tokens / padded_capacity:.1%}")
    print(f"packing speed-up: {packed_rate / padded_rate:.2f}x")
    bf16_rate = bf16_tokens / bf16_s
    print(f"packed under bf16 autocast (train.precision: bf16): {bf16_rate:,.0f} real tokens/s, "
          f"{bf16_rate / packed_rate:.2f}x fp32's")
    print(f"training step: {flops / 1e9:.2f} GFLOP in {packed_s / STEPS * 1000:.0f} ms = {achieved / 1e9:.2f} GFLOP/s; "
          f"plain 1024x1024 fp32 matmul: {peak / 1e9:.1f} GFLOP/s -> {achieved / peak:.1%} of matmul")
    print(f"a step with its batch built inline: {steps_with['inline'] * 1000:.0f} ms; built by a prefetch thread: "
          f"{steps_with['prefetch thread'] * 1000:.0f} ms ({os.cpu_count()} cores, {torch.get_num_threads()} "
          f"intra-op threads; the training loop prefetches only with a core to spare)")
    whole, trimmed = audio_window_seconds(None), audio_window_seconds(0.5)
    print(f"micro Whisper stand-in, 32 windows of 4 s holding 0.8-2.4 s of speech, forward + backward: whole windows "
          f"{whole * 1000:.0f} ms, trimmed to their audio (trim_seconds 0.5) {trimmed * 1000:.0f} ms: {whole / trimmed:.2f}x")


if __name__ == "__main__":
    main()
