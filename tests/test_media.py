"""Images, audio and video files into encoder inputs: formats, geometry, exactness, bad input."""

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from omniforge.data.media_writers import write_audio, write_video
from omniforge.errors import (
    EmptyMediaError,
    MediaError,
    MediaTooLargeError,
    UnreadableMediaError,
    UnsupportedMediaError,
)
from omniforge.processing.audio import AudioProcessor, load_audio, resample
from omniforge.processing.image import ImageProcessor, choose_grid, load_image
from omniforge.processing.video import FrameSampling, load_video


def image_bytes(image, fmt, **kw):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


# --------------------------------------------------------------------------- images

@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("JPEG", "RGB"), ("WEBP", "RGB"), ("BMP", "RGB"),
                                       ("TIFF", "CMYK"), ("PNG", "P"), ("PNG", "L"), ("PNG", "RGBA"),
                                       ("PNG", "I;16"), ("GIF", "P"), ("PNG", "LA")])
def test_common_formats_and_modes_become_rgb(fmt, mode):
    image = Image.new("RGB", (40, 30), (200, 30, 10)).convert(mode)
    loaded = load_image(image_bytes(image, fmt))
    assert loaded.mode == "RGB" and loaded.size == (40, 30)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(image_bytes(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    r, g, b = load_image(buffer.getvalue()).getpixel((0, 0))
    assert r > 200 and b < 50


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    assert load_image(image_bytes(image, "JPEG", exif=exif)).size == (20, 40)


def test_bad_images_raise_one_error_type_per_kind(tmp_path):
    with pytest.raises(UnreadableMediaError, match="missing.png: cannot read"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(EmptyMediaError, match="empty.png: empty image file"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_bytes(b"hello, not an image")
    with pytest.raises(UnsupportedMediaError, match="text.png: not an image format"):
        load_image(tmp_path / "text.png")
    truncated = image_bytes(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")[:200]
    with pytest.raises(UnreadableMediaError, match="corrupt or truncated"):
        load_image(truncated)
    with pytest.raises(MediaTooLargeError, match="exceeds the limit"):
        load_image(image_bytes(Image.new("RGB", (100, 100)), "PNG"), max_pixels=5000)


def test_decompression_bomb_is_refused():
    bomb = image_bytes(Image.new("1", (20000, 20000)), "PNG")  # ~50 KB that unpacks to 400 M pixels
    with pytest.raises(MediaTooLargeError):
        load_image(bomb)


@pytest.mark.parametrize("size, grid", [((448, 448), (1, 1)), ((896, 448), (2, 1)), ((448, 1344), (1, 3)),
                                        ((1920, 1080), (4, 2)), ((5000, 100), (9, 1))])
def test_grid_is_the_closest_aspect_ratio(size, grid):
    assert choose_grid(*size, tile_size=448, max_tiles=9) == grid


def test_tiles_are_cut_row_by_row_with_a_thumbnail():
    processor = ImageProcessor(tile_size=16, max_tiles=4, mean=(0, 0, 0), std=(1, 1, 1))
    image = np.zeros((32, 32, 3), np.uint8)
    image[:16, 16:] = 255  # top-right quadrant white
    tiled = processor(Image.fromarray(image))
    assert tiled.grid == (2, 2) and tiled.thumbnail and tiled.pixel_values.shape == (5, 3, 16, 16)
    means = tiled.pixel_values.mean(dim=(1, 2, 3))
    assert means[1] > 0.99 and means[[0, 2, 3]].max() < 0.01 and 0.2 < means[4] < 0.3
    assert processor.num_tiles(32, 32) == 5 and processor.num_tiles(32, 32, max_tiles=1) == 1


def test_normalisation_comes_from_the_towers_processor_file(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text('{"image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2]}')
    processor = ImageProcessor.from_tower_folder(tmp_path, tile_size=8)
    value = processor(Image.new("RGB", (8, 8), (255, 255, 255))).pixel_values[0, 0, 0, 0]
    assert value == pytest.approx((1 - 0.4) / 0.2)


# --------------------------------------------------------------------------- audio

def tone(seconds, rate=16_000, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("ext", [".wav", ".flac", ".ogg", ".mp3", ".m4a"])
def test_audio_formats_decode_to_16k_mono(tmp_path, ext):
    path = write_audio(tmp_path / f"a{ext}", tone(1.0, 24_000), sample_rate=24_000)
    waveform = load_audio(path)
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert abs(len(waveform) - 16_000) < 2_000  # codecs pad by a frame or two
    spectrum = np.abs(np.fft.rfft(waveform[2000:14000]))
    assert abs(np.argmax(spectrum) * 16_000 / 12_000 - 440) < 5


def test_stereo_is_downmixed(tmp_path):
    import soundfile

    soundfile.write(tmp_path / "s.wav", np.stack([tone(0.5), -tone(0.5)], axis=1), 16_000)
    assert np.abs(load_audio(tmp_path / "s.wav")).max() < 1e-4  # the channels cancel


def test_resampler_gives_what_scipy_designs_and_filters():
    from scipy.signal import resample_poly

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        speech = rng.standard_normal(22_050).astype(dtype)
        ours = resample(speech, 22_050, 16_000)  # piper's rate; its filter is designed once and kept
        assert ours.dtype == np.float32 and len(ours) == 16_000
        np.testing.assert_array_equal(ours, resample_poly(speech, 320, 441).astype(np.float32))


def test_resampler_removes_what_would_alias():
    above_nyquist = tone(1.0, 48_000, freq=12_000)  # folds to 4 kHz if not filtered
    assert np.abs(resample(above_nyquist, 48_000, 16_000)[500:-500]).max() < 0.01  # away from the edges


@pytest.mark.parametrize("seconds, bins", [(0.2, 80), (3.7, 128), (12.0, 80), (30.0, 128)])
def test_log_mel_matches_whisper_feature_extractor(seconds, bins):
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    waveform = tone(seconds) + rng.normal(0, 0.02, int(seconds * 16_000)).astype(np.float32)
    expected = WhisperFeatureExtractor(feature_size=bins)(waveform, sampling_rate=16_000,
                                                          return_tensors="np").input_features[0]
    ours = AudioProcessor(num_mel_bins=bins)(waveform)
    assert ours.features.shape == (1, bins, 3000)
    assert np.abs(ours.features[0].numpy() - expected).max() < 1e-3


def test_long_audio_is_split_into_windows_not_truncated():
    processor = AudioProcessor(num_mel_bins=80, window_frames=3000)
    out = processor(tone(70.0))
    assert out.features.shape == (3, 80, 3000) and out.valid_frames.tolist() == [3000, 3000, 1000]
    later = processor(tone(70.0)[60 * 16_000:])  # the last window equals the last 10 s on their own
    torch.testing.assert_close(out.features[2], later.features[0])


def test_bad_audio_raises_one_error_type_per_kind(tmp_path):
    with pytest.raises(UnreadableMediaError, match="nope.wav: cannot read"):
        load_audio(tmp_path / "nope.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(EmptyMediaError, match="empty.wav"):
        load_audio(tmp_path / "empty.wav")
    (tmp_path / "junk.mp3").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(MediaError, match="junk.mp3"):
        load_audio(tmp_path / "junk.mp3")
    write_audio(tmp_path / "long.wav", tone(3.0))
    with pytest.raises(MediaTooLargeError, match="exceeds the limit of 2 s"):
        load_audio(tmp_path / "long.wav", max_seconds=2)


@pytest.mark.parametrize("name, as_bytes", [("long.wav", False), ("long.wav", True), ("long.m4a", False)])
def test_too_long_audio_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch, name, as_bytes):
    import soundfile

    from omniforge.processing import audio

    path = write_audio(tmp_path / name, tone(3.0))

    def decode(*args, **kwargs):
        raise AssertionError("decoded audio that the header already shows too long")

    monkeypatch.setattr(soundfile, "read", decode)  # wav: libsndfile
    monkeypatch.setattr(audio, "decode_audio_stream", decode)  # m4a: FFmpeg
    with pytest.raises(MediaTooLargeError, match="3 s of audio exceeds the limit of 2 s"):
        load_audio(path.read_bytes() if as_bytes else path, max_seconds=2)


# --------------------------------------------------------------------------- video

def moving_square(n, width=64, height=48):
    frames = []
    for i in range(n):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[..., 0] = i % 256  # red channel encodes the frame index
        frames.append(frame)
    return frames


@pytest.mark.parametrize("duration, count", [(2.0, 4), (3.9, 4), (4.0, 4), (10.0, 10), (16.0, 16), (40.0, 16)])
def test_vita_frame_sampling_rule(duration, count):
    times = FrameSampling().times(duration)
    assert len(times) == count and all(0 < t < duration for t in times)
    assert np.allclose(np.diff(times), duration / count)


def test_fps_mode():
    assert len(FrameSampling(fps=2.0).times(5.0)) == 10
    assert len(FrameSampling(fps=2.0, long_frames=6).times(5.0)) == 6


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".mkv", ".avi", ".gif"])
def test_video_containers_decode_the_sampled_frames(tmp_path, ext):
    path = write_video(tmp_path / f"v{ext}", moving_square(60), fps=10)  # 6 s at 10 fps -> 6 frames at 1 fps
    video = load_video(path)
    assert len(video.frames) == 6 and abs(video.duration - 6.0) < 0.2
    for frame, t in zip(video.frames, video.timestamps):
        index = round(t * 10)
        assert abs(np.asarray(frame)[..., 0].mean() - index) < 8  # the frame shown at t, not another one


def test_video_with_its_audio_track(tmp_path):
    path = write_video(tmp_path / "v.mp4", moving_square(30), fps=10, audio=tone(3.0))
    video = load_video(path, with_audio=True)
    assert video.audio is not None and abs(len(video.audio) - 48_000) < 3_000
    assert load_video(path).audio is None


def test_variable_frame_rate_uses_each_frames_own_time(tmp_path):
    times = [0.0, 0.1, 0.2, 3.0, 3.1, 6.0, 9.0, 9.5]  # bursts and gaps
    path = write_video(tmp_path / "vfr.mkv", moving_square(len(times)), fps=10, timestamps=times)
    video = load_video(path, FrameSampling(short_seconds=100, short_frames=4))
    for frame, t in zip(video.frames, video.timestamps):
        assert any(abs(t - s) < 0.02 for s in times)
        assert abs(np.asarray(frame)[..., 0].mean() - times.index(min(times, key=lambda s: abs(s - t)))) < 8


def test_stream_without_duration_or_seeking_is_decoded_in_order(tmp_path):
    import av

    path = tmp_path / "raw.h264"  # an elementary stream: no container, no timestamps, no seeking
    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i, array in enumerate(moving_square(50)):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    video = load_video(path)
    assert video.duration == pytest.approx(2.0)  # 50 frames at the stream's 25 fps
    assert len(video.frames) == 4  # shorter than 4 s: 4 frames
    for frame, t in zip(video.frames, video.timestamps):
        assert abs(np.asarray(frame)[..., 0].mean() - round(t * 25)) < 8


def test_bad_video_raises_one_error_type_per_kind(tmp_path):
    with pytest.raises(UnreadableMediaError, match="absent.mp4: cannot read"):
        load_video(tmp_path / "absent.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(EmptyMediaError):
        load_video(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"definitely not a video" * 40)
    with pytest.raises(UnsupportedMediaError, match="junk.mp4"):
        load_video(tmp_path / "junk.mp4")
    write_audio(tmp_path / "only_audio.m4a", tone(1.0))
    with pytest.raises(UnsupportedMediaError, match="no video stream"):
        load_video(tmp_path / "only_audio.m4a")


# --------------------------------------------------------------------------- fuzzing

@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return {
        "image": image_bytes(Image.effect_noise((32, 32), 40).convert("RGB"), "PNG"),
        "audio": write_audio(root / "a.mp3", tone(0.5)).read_bytes(),
        "video": write_video(root / "v.mp4", moving_square(10), fps=10).read_bytes(),
    }


LOADERS = {"image": load_image, "audio": load_audio, "video": load_video}


@pytest.mark.parametrize("kind", ["image", "audio", "video"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0, 1), noise=st.binary(max_size=64), position=st.floats(0, 1))
def test_truncated_and_corrupted_files_raise_media_errors_only(valid_files, kind, cut, noise, position):
    data = valid_files[kind][: int(len(valid_files[kind]) * cut)]
    at = int(len(data) * position)
    data = data[:at] + noise + data[at + len(noise):]
    try:
        LOADERS[kind](data)
    except MediaError:
        pass  # a clear, typed error is the only acceptable failure


@pytest.mark.parametrize("kind", ["image", "audio", "video"])
@settings(max_examples=15, deadline=None)
@given(data=st.binary(max_size=2048))
def test_random_bytes_raise_media_errors_only(kind, data):
    try:
        LOADERS[kind](data)
    except MediaError:
        pass
