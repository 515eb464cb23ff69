"""Conversations into ids, labels and media: both formats, templates, states, placeholders."""

import base64
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from omniforge.data.media_writers import write_audio, write_video
from omniforge.errors import MediaError, PlaceholderCountError
from omniforge.processing.chat import IGNORE, ConversationError, OmniProcessor


@pytest.fixture(scope="module")
def processor(omni_model):
    return OmniProcessor.from_model(omni_model)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    Image.new("RGB", (64, 32), (250, 0, 0)).save(root / "wide.png")
    Image.new("RGB", (32, 32), (0, 0, 250)).save(root / "square.jpg")
    write_audio(root / "speech.wav", (0.1 * np.sin(np.arange(24_000) / 5)).astype(np.float32))
    frames = [np.full((32, 32, 3), i * 20, np.uint8) for i in range(10)]
    write_video(root / "clip.mp4", frames, fps=5)  # 2 s -> 4 frames
    return root


def labelled_text(processor, encoded):
    return processor.tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE])


def test_jsonl_record_expands_every_placeholder_to_its_feature_count(processor, files):
    record = {"messages": [{"role": "user", "content": "<image> and <video>: what changes?"},
                           {"role": "assistant", "content": "It gets brighter."},
                           {"role": "user", "content": "<audio><image>"},
                           {"role": "assistant", "content": "Blue."}],
              "images": ["wide.png", "square.jpg"], "videos": ["clip.mp4"], "audios": ["speech.wav"]}
    encoded = processor.encode_record(record, base_dir=files)
    per_tile = processor.media.tokens_per_tile
    ids = encoded.input_ids
    assert ids.count(processor.placeholder_ids["image"]) == (3 + 1) * per_tile  # 2x1 grid + thumbnail, then 1 tile
    assert ids.count(processor.placeholder_ids["video"]) == 4 * per_tile
    assert ids.count(processor.placeholder_ids["audio"]) == processor.media.audio_geometry.tokens(24_000)
    assert [m.modality for m in encoded.media] == ["image", "video", "audio", "image"]  # text order
    assert encoded.data_type == "video"
    assert encoded.media[1].info["frames"] == 4


def test_labels_cover_assistant_turns_only_each_starting_with_its_state(processor, files):
    tokens = processor.config.tokens
    record = {"messages": [{"role": "user", "content": "What colour? <image>"},
                           {"role": "assistant", "content": "Red."},
                           {"role": "user", "content": "<audio>"},
                           {"role": "assistant", "content": "I heard you."}],
              "images": ["wide.png"], "audios": ["speech.wav"]}
    encoded = processor.encode_record(record, base_dir=files)
    assert labelled_text(processor, encoded).replace("<|im_end|>", "|").split() == [
        f"{tokens.state_text}Red.|", f"{tokens.state_speech}I", "heard", "you.|"]
    full = processor.tokenizer.decode(encoded.input_ids)
    assert full.startswith("<|im_start|>system\n" + processor.config.chat.system_image)
    assert all(label == IGNORE for token, label in zip(encoded.input_ids, encoded.labels)
               if token in processor.placeholder_ids.values())


def test_an_answer_to_a_spoken_query_may_say_first_what_it_heard(processor, files):
    tokens = processor.config.tokens
    messages = [{"role": "user", "content": "<image><audio>"},
                {"role": "assistant", "content": "red", "heard": "what colour is the circle"}]
    encoded = processor.encode_record({"messages": messages, "images": ["wide.png"], "audios": ["speech.wav"]},
                                      base_dir=files)
    assert labelled_text(processor, encoded) == (f"{tokens.state_speech}{tokens.heard}what colour is the circle"
                                                 f"{tokens.heard_end}red<|im_end|>\n")
    for state, heard, error in [("text", "what colour", "this turn's state is 'text'"),
                                ("speech", 3, "expected a string (what was heard), got int")]:
        wrong = [messages[0], {**messages[1], "state": state, "heard": heard}]
        with pytest.raises(ConversationError, match=r"sample\.messages\[1\]\.heard: .*" + re.escape(error)):
            processor.encode(wrong, {"image": [files / "wide.png"], "audio": [files / "speech.wav"]})


def test_background_audio_gets_the_background_state_and_no_answer(processor, files):
    record = {"messages": [{"role": "user", "content": "<audio>"},
                           {"role": "assistant", "content": "", "state": "background"}], "audios": ["speech.wav"]}
    encoded = processor.encode_record(record, base_dir=files)
    assert labelled_text(processor, encoded) == processor.config.tokens.state_background + "<|im_end|>\n"


def test_system_prompt_per_data_type_and_override(processor, files):
    chat = processor.config.chat
    cases = [({"images": ["square.jpg"]}, "<image>", chat.system_image),
             ({"audios": ["speech.wav"]}, "Transcribe: <audio>", chat.system_audio),
             ({}, "Hi", chat.system_text)]
    for media, content, system in cases:
        record = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "x"}], **media}
        text = processor.tokenizer.decode(processor.encode_record(record, base_dir=files).input_ids)
        assert f"system\n{system}<|im_end|>" in text
    record = {"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}]}
    assert "system\nBe brief." in processor.tokenizer.decode(processor.encode_record(record).input_ids)


def test_openai_format_gives_the_same_tensors_as_jsonl(processor, files):
    png = base64.b64encode((files / "wide.png").read_bytes()).decode()
    wav = base64.b64encode((files / "speech.wav").read_bytes()).decode()
    openai = processor.encode_openai([
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                                     {"type": "text", "text": " then "},
                                     {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
                                     {"type": "video_url", "video_url": {"url": str(files / "clip.mp4")}}]}])
    jsonl = processor.encode_record({"messages": [{"role": "user", "content": "<image> then <audio><video>"}],
                                     "images": ["wide.png"], "audios": ["speech.wav"], "videos": ["clip.mp4"]},
                                    base_dir=files)
    prompt_only = processor.encode([{"role": "user", "content": "<image> then <audio><video>"}],
                                   {"image": [files / "wide.png"], "audio": [files / "speech.wav"],
                                    "video": [files / "clip.mp4"]}, add_generation_prompt=True)
    assert openai.input_ids == prompt_only.input_ids
    assert openai.input_ids[: len(jsonl.input_ids) - 1] == jsonl.input_ids[:-1]
    for a, b in zip(openai.media, prompt_only.media):
        for key in ("pixel_values", "audio_features"):
            if getattr(a, key) is not None:
                assert np.array_equal(getattr(a, key).numpy(), getattr(b, key).numpy())


def test_generation_prompt_ends_where_the_assistant_starts(processor):
    encoded = processor.encode([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert processor.tokenizer.decode(encoded.input_ids).endswith("<|im_start|>assistant\n")
    assert all(label == IGNORE for label in encoded.labels)


@pytest.mark.parametrize("record, error, message", [
    ({"messages": [{"role": "user", "content": "<image><image>"}], "images": ["square.jpg"]},
     PlaceholderCountError, "sample: 2 <image> placeholder\\(s\\) in the messages but 1 image\\(s\\) given"),
    ({"messages": [{"role": "user", "content": "hi"}], "audios": ["speech.wav"]},
     PlaceholderCountError, "0 <audio> placeholder"),
    ({"messages": "hello"}, ConversationError, "expected an object with a 'messages' list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, ConversationError, "messages\\[0\\]: expected a role"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, ConversationError, "content: expected a string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "state": "sad"}]},
     ConversationError, "state: expected one of"),
    ({"messages": [{"role": "user", "content": "<image>"}], "images": ["missing.png"]},
     MediaError, "sample.images\\[0\\]: .*missing.png: cannot read"),
    ({"system": "look: <image>", "messages": [{"role": "user", "content": "<image>"}], "images": ["square.jpg"]},
     ConversationError, "sample.system: holds <image>; media placeholders belong in messages"),
    ({"messages": [{"role": "user", "content": "<audio>"},  # a background turn's answer is dropped, and its image
                   {"role": "assistant", "content": "<image>", "state": "background"}],
      "audios": ["speech.wav"], "images": ["square.jpg"]},
     PlaceholderCountError, "sample: 0 <image> placeholder\\(s\\) in the rendered conversation but 1 image\\(s\\) given"),
    ({"messages": [{"role": "user", "content": "<image>"}], "images": [None]},
     ConversationError, "sample.images\\[0\\]: expected a file path \\(a string\\), got None"),
    ({"messages": [{"role": "user", "content": "<audio>"}], "audios": [3]},
     ConversationError, "sample.audios\\[0\\]: expected a file path \\(a string\\), got 3"),
    ({"system": 5, "messages": [{"role": "user", "content": "hi"}]},
     ConversationError, "sample.system: expected a string or null, got int"),
])
def test_bad_records_raise_clear_errors(processor, files, record, error, message):
    with pytest.raises(error, match=message):
        processor.encode_record(record, base_dir=files)


def test_openai_rejects_remote_urls_and_bad_parts(processor):
    with pytest.raises(ConversationError, match="no network"):
        processor.encode_openai([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    with pytest.raises(ConversationError, match="unsupported content part type 'file'"):
        processor.encode_openai([{"role": "user", "content": [{"type": "file"}]}])


def test_collate_pads_and_keeps_media_in_sample_order(processor, files, omni_model):
    a = processor.encode_record({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}],
                                 "images": ["wide.png"]}, base_dir=files)
    b = processor.encode_record({"messages": [{"role": "user", "content": "long question " * 5 + "<image>"},
                                              {"role": "assistant", "content": "b"}], "images": ["square.jpg"]},
                                base_dir=files)
    batch = processor.collate([a, b])
    assert batch["pixel_values"].shape[0] == 3 + 1
    assert batch["attention_mask"].sum(1).tolist() == [len(a), len(b)]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    left = processor.collate([a, b], padding_side="left")
    assert left["input_ids"][0, -1] == a.input_ids[-1] and left["attention_mask"][0, 0] == 0
    assert omni_model(**batch).loss.isfinite()


# --------------------------------------------------------------------------- omniforge tokens

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "omniforge.cli", *args], capture_output=True, text=True, timeout=120)


def test_tokens_cli_uses_the_7b_settings_by_default(tmp_path):
    Image.new("RGB", (1920, 1080)).save(tmp_path / "hd.jpg")
    soundfile.write(tmp_path / "long.flac", np.zeros(16_000 * 45, np.float32), 16_000)
    write_video(tmp_path / "clip.mp4", [np.zeros((32, 32, 3), np.uint8)] * 100, fps=10)  # 10 s
    result = run_cli("tokens", str(tmp_path / "hd.jpg"), str(tmp_path / "long.flac"), str(tmp_path / "clip.mp4"),
                     "--json")
    assert result.returncode == 0, result.stderr
    image, audio, video = (json.loads(line) for line in result.stdout.splitlines())
    assert (image["tiles"], image["grid"], image["tokens"]) == (9, [4, 2], 9 * 256)
    assert (audio["audio_seconds"], audio["windows"], audio["tokens"]) == (45.0, 2, 375 + 188)
    assert (video["frames"], video["tokens"]) == (10, 10 * 256)
    assert video["timestamps"][0] == pytest.approx(0.5, abs=0.06)


def test_tokens_cli_text_output_recipe_and_overrides(tmp_path):
    Image.new("RGB", (1920, 1080)).save(tmp_path / "hd.png")
    text = run_cli("tokens", str(tmp_path / "hd.png"), "vision.max_tiles=4").stdout
    assert "grid 2x1 + thumbnail = 3 tiles -> 768 tokens" in text
    tiny = run_cli("tokens", str(tmp_path / "hd.png"), "--recipe", "recipes/models/tiny.yaml").stdout
    assert "-> 48 tokens" in tiny  # 3 tiles x 16 tokens (64-px tiles, 8-px patches, 2x2 pooling)
    path_valued = run_cli("tokens", str(tmp_path / "hd.png"), f"vision.path={tmp_path / 'other-tower'}", "vision.max_tiles=4")
    assert "-> 768 tokens" in path_valued.stdout, path_valued.stderr  # an override, not a file to read


def test_tokens_cli_reports_unreadable_files(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("hello")
    result = run_cli("tokens", str(tmp_path / "broken.png"), str(tmp_path / "notes.txt"))
    assert result.returncode == 1 and "broken.png: not an image format" in result.stdout
    assert "notes.txt: error:" in result.stdout and "(2 unreadable)" in result.stdout  # both listed, neither fatal


def test_audio_and_video_of_one_file(processor, tmp_path):
    frames = [np.full((32, 32, 3), i * 20, np.uint8) for i in range(10)]
    clip = write_video(tmp_path / "talk.mp4", frames, fps=5, audio=np.zeros(32_000, np.float32))
    encoded = processor.encode_record({"messages": [{"role": "user", "content": "<video><audio>"}],
                                       "videos": [str(clip)], "audios": [str(clip)]})  # the track of the same file
    video, audio = encoded.media
    assert video.info["frames"] == 4 and abs(audio.info["seconds"] - 2.0) < 0.2
    times = video.frame_times  # each frame's share of the clip: about 1/8, 3/8, 5/8, 7/8
    assert times.shape == (4,) and bool((times.diff() > 0).all())
    torch.testing.assert_close(times, torch.tensor([0.125, 0.375, 0.625, 0.875]), atol=0.1, rtol=0)
