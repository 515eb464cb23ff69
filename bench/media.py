"""Media processing throughput, each figure a ratio against a baseline measured in the same run.

    python bench/media.py            # ~1 minute on a 2-core CPU

1. images/s through load + tiling + normalisation (1920x1080 JPEG -> 9 tiles + thumbnail, 448 px);
2. sampled-frame video decode (VITA rule: 16 frames) vs decoding every frame, 60-s 30-fps clip;
3. log-mel: seconds of audio per second vs transformers' WhisperFeatureExtractor, on clips of
   1-20 s (a speech dataset's spread) and on a 30-s clip.
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import omniforge  # noqa: E402,F401
from omniforge.data.media_writers import write_video  # noqa: E402
from omniforge.processing.audio import AudioProcessor  # noqa: E402
from omniforge.processing.image import ImageProcessor, load_image  # noqa: E402
from omniforge.processing.video import load_video  # noqa: E402


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_images() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    processor = ImageProcessor(tile_size=448, max_tiles=9)
    n = 10
    decode = best_of(lambda: [load_image(data) for _ in range(n)])
    full = best_of(lambda: [processor(load_image(data)) for _ in range(n)])
    print(f"images: {n / full:.1f} images/s (1920x1080 JPEG -> 10 tiles of 448 px, {10 * n / full:.0f} tiles/s); "
          f"JPEG decode alone {n / decode:.1f} images/s, so tiling+normalising costs {(full - decode) / full:.0%}")


def bench_video(folder: Path) -> None:
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (360, 640, 3), dtype=np.uint8)
    frames = [np.roll(base, 4 * i, axis=1) for i in range(60 * 30)]  # moving texture, 60 s at 30 fps
    for gop, what in ((30, "a keyframe a second, as phones and streams write"), (250, "x264's default 250")):
        path = write_video(folder / f"clip{gop}.mp4", frames, fps=30, gop=gop)

        def decode_all(convert: bool):
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                return [frame.to_image() if convert else frame for frame in container.decode(stream)]

        every_image = best_of(lambda: decode_all(True), 2)
        every_frame = best_of(lambda: decode_all(False), 2)
        sampled = best_of(lambda: load_video(path), 3)
        print(f"video, 60-s 30-fps 640x360 H.264, keyframes: {what}: 16 sampled frames in {sampled:.2f} s; "
              f"decoding every frame to images {every_image:.2f} s -> {every_image / sampled:.1f}x "
              f"(target >= 5x); decoding every frame without converting {every_frame:.2f} s -> "
              f"{every_frame / sampled:.1f}x")


def bench_audio() -> None:
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    clips = [rng.normal(0, 0.1, int(s * 16_000)).astype(np.float32) for s in rng.uniform(1, 20, 40)]
    seconds = sum(len(c) for c in clips) / 16_000
    for bins in (80, 128):
        reference = WhisperFeatureExtractor(feature_size=bins)
        ours = AudioProcessor(num_mel_bins=bins)
        theirs_t = best_of(lambda: [reference(c, sampling_rate=16_000, return_tensors="np") for c in clips])
        ours_t = best_of(lambda: [ours(c) for c in clips])
        long = rng.normal(0, 0.1, 30 * 16_000).astype(np.float32)
        theirs_30 = best_of(lambda: [reference(long, sampling_rate=16_000, return_tensors="np") for _ in range(10)])
        ours_30 = best_of(lambda: [ours(long) for _ in range(10)])
        print(f"log-mel {bins} bins: 1-20 s clips {seconds / ours_t:.0f} s of audio/s vs WhisperFeatureExtractor "
              f"{seconds / theirs_t:.0f} -> {theirs_t / ours_t:.1f}x (target >= 2x); full 30-s windows "
              f"{300 / ours_30:.0f} vs {300 / theirs_30:.0f} s/s -> {theirs_30 / ours_30:.1f}x")


if __name__ == "__main__":
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_images()
    with tempfile.TemporaryDirectory() as tmp:
        bench_video(Path(tmp))
    bench_audio()
