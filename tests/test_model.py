import os
import re
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_batch, omni_config
from omniforge.config import VisionConfig, load_config
from omniforge.errors import CheckpointError, ConfigError, PlaceholderCountError
from omniforge.model.omni import OmniModel
from omniforge.model.vision import VisionEncoder
from omniforge.processing.counts import AudioGeometry, tokens_per_tile

MIXED = [
    {"text": "Describe <image> please.", "images": [(32, 32)]},  # 1 tile
    {"text": "What is said? <audio>", "audios": [16_000]},
    {"text": "Compare <image> with what you hear: <audio>", "images": [(64, 32)], "audios": [40_000]},  # 2+1 tiles
    {"text": "Just text, nothing else."},
    {"text": "Video <video> and image <image>", "videos": [3], "images": [(32, 32)]},
]


# --------------------------------------------------------------------------- token counts

@pytest.mark.parametrize("tile, patch, pool, expected", [
    (448, 14, 2, 256), (448, 14, 1, 1024), (384, 14, 2, 196), (224, 14, 2, 64), (72, 8, 2, 25), (64, 8, 4, 4),
])
def test_tokens_per_tile_formula(tile, patch, pool, expected):
    assert tokens_per_tile(tile, patch, pool) == expected


def test_audio_token_formula_and_windows():
    whisper = AudioGeometry(window_frames=3000, stack=4)  # whisper-large-v3 at 12.5 tokens/s
    assert whisper.tokens(30 * 16_000) == 375
    assert whisper.window_lengths(45 * 16_000) == [3000, 1500]  # nothing beyond 30 s is dropped
    assert whisper.tokens(45 * 16_000) == 375 + 188
    assert whisper.tokens(16_000) == 13  # 100 frames -> 50 encoder frames -> ceil(12.5)
    assert AudioGeometry(window_frames=3000, stack=2).tokens(2 * 16_000) == 50  # VITA: 25 tokens / 2 s (at 25/s)


@pytest.mark.parametrize("tile_size, pool", [(32, 2), (48, 2), (64, 1), (40, 3)])
def test_vision_encoder_output_matches_formula(hf_parts, tile_size, pool):
    encoder = VisionEncoder.from_config(VisionConfig(path=str(hf_parts / "siglip"), tile_size=tile_size, pool=pool),
                                        torch.float32)
    out = encoder(torch.randn(3, 3, tile_size, tile_size))
    assert out.shape == (3, tokens_per_tile(tile_size, 8, pool), 32)
    assert encoder.interpolate == (tile_size != 32)  # position embeddings interpolated off the native size


def test_pooling_averages_every_patch(omni_model):
    import torch.nn.functional as F

    tower = omni_model.vision.tower
    by_3 = VisionEncoder(tower, tile_size=48, pool=3)  # 6x6 patches -> 2x2 tokens
    features = torch.zeros(1, 36, 32)
    features[0, 0] = 9.0  # a corner patch: bilinear sampling at 3x reads rows and columns 1 and 4 only
    torch.testing.assert_close(by_3.pool_grid(features)[0, :, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    by_2 = VisionEncoder(tower, tile_size=32, pool=2)  # 4x4 -> 2x2: bilinear as trained, the mean of each 2x2 block
    features = torch.randn(2, 16, 32)
    blocks = F.avg_pool2d(features.transpose(1, 2).reshape(2, 32, 4, 4), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(by_2.pool_grid(features), blocks)


@pytest.mark.parametrize("seconds", [0.3, 1.0, 2.0, 2.5, 4.7])
def test_audio_encoder_output_matches_formula(omni_model, seconds):
    geometry = omni_model.audio.geometry  # 2-s windows in the tiny Whisper
    samples = int(seconds * 16_000)
    valid = torch.tensor(geometry.window_lengths(samples))
    features = torch.randn(len(valid), 80, geometry.window_frames)
    assert omni_model.audio(features, valid).shape == (geometry.tokens(samples), 32 * geometry.stack)


def test_trimmed_windows_equal_each_window_encoded_alone_to_its_rounded_length(omni_model):
    """`audio.trim_seconds`: a window's frames depend only on its own audio (not on the batch), are
    the encoder's on the rounded-up length, and untrimmed (full) windows match the HF forward."""
    from omniforge.model.audio import AudioEncoder

    torch.manual_seed(0)
    tower = omni_model.audio.encoder.eval()
    trimmed = AudioEncoder(tower, trim_seconds=0.5)
    window = trimmed.geometry.window_frames  # 200 frames (2 s)
    assert trimmed.trim_frames == 48  # 0.5 s rounded to whole tokens (2 x 4 frames a token)
    features, valid = torch.randn(4, 80, window), torch.tensor([window, 30, 100, 48])
    with torch.no_grad():
        batch = trimmed.encode(features, valid)
        alone = [trimmed.encode(features[i:i + 1], valid[i:i + 1])[0] for i in range(4)]
        full = tower(input_features=features).last_hidden_state
    for i, length in enumerate([window, 48, 144, 48]):
        torch.testing.assert_close(batch[i], alone[i])
        assert batch[i, length // 2:].abs().sum() == 0
        if length < window:  # the padding a whole window's frames attend to is gone
            assert not torch.allclose(batch[i, :length // 2], full[i, :length // 2])
    torch.testing.assert_close(batch[0], full[0])
    assert trimmed(features, valid).shape == AudioEncoder(tower)(features, valid).shape  # the same token counts


# --------------------------------------------------------------------------- loading

@pytest.mark.parametrize("llm, vision, audio", [
    ("qwen2", "siglip", "whisper"), ("llama", "clip", "whisper128"), ("qwen2", None, "whisper"), ("llama", "clip", None),
])
def test_loads_every_supported_part_from_hf_folders(hf_parts, llm, vision, audio):
    model = OmniModel.from_config(omni_config(hf_parts, llm=llm, vision=vision, audio=audio))
    assert model.llm.config.model_type == llm
    assert (model.vision is None) == (vision is None) and (model.audio is None) == (audio is None)
    if audio:
        assert model.audio.num_mel_bins == (128 if audio == "whisper128" else 80)


def test_llm_checkpoint_without_every_tensor_in_its_shape_is_refused(hf_parts, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY_LLM
    from omniforge.model.loading import load_llm

    folder = shutil.copytree(hf_parts / "qwen2", tmp_path / "qwen2")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(47)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(
            f"llm.path: {folder} does not fit the configured LLM: model.layers.1.mlp.up_proj.weight is missing; "
            "model.norm.weight has shape (47,), the configured model expects (48,)")):
        load_llm(str(folder), None, torch.float32, "sdpa")
    # tied embeddings: no lm_head.weight is stored, and none is missing
    tied = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **TINY_LLM, tie_word_embeddings=True))
    tied.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    llm = load_llm(str(tmp_path / "tied"), None, torch.float32, "sdpa")
    assert llm.lm_head.weight is llm.get_input_embeddings().weight


def test_llm_built_from_arch_ends_sequences_only_where_arch_says():
    from omniforge.model.loading import load_llm

    arch = dict(model_type="llama", vocab_size=272, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2)
    # Llama's default eos id 2 is a byte of the byte-level tokenizer, not an end of sequence
    assert load_llm(None, arch, torch.float32, "sdpa").generation_config.eos_token_id is None
    assert load_llm(None, {**arch, "eos_token_id": 5}, torch.float32, "sdpa").generation_config.eos_token_id == 5


def test_tower_weights_come_from_the_checkpoint(hf_parts):
    from safetensors.torch import load_file

    model = OmniModel.from_config(omni_config(hf_parts))
    siglip = load_file(hf_parts / "siglip" / "model.safetensors")
    whisper = load_file(hf_parts / "whisper" / "model.safetensors")
    key = "encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.vision.tower.state_dict()[key], siglip["vision_model." + key])  # not text_model.
    assert torch.equal(model.audio.encoder.conv1.weight, whisper["model.encoder.conv1.weight"])


def test_tokenizer_gains_placeholder_and_state_tokens(omni_model):
    vocab = omni_model.tokenizer.get_vocab()
    for token in omni_model.config.tokens.all():
        assert token in vocab
        assert len(omni_model.tokenizer(token, add_special_tokens=False).input_ids) == 1
    assert omni_model.llm.get_input_embeddings().num_embeddings >= len(omni_model.tokenizer)


def test_text_only_logits_equal_the_bare_llm(hf_parts, omni_model):
    from transformers import AutoModelForCausalLM

    bare = AutoModelForCausalLM.from_pretrained(hf_parts / "qwen2").eval()
    ids = omni_model.tokenizer(["The red square is left of the circle."], return_tensors="pt").input_ids
    with torch.no_grad():
        ours = omni_model(ids).logits
        theirs = bare(ids).logits
    vocab = theirs.shape[-1]
    torch.testing.assert_close(ours[..., :vocab], theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("key, path, message", [
    ("llm", "/nonexistent/qwen", "llm.path: /nonexistent/qwen is not a folder"),
    ("vision", "EMPTY", "vision.path: .* has no config.json"),
])
def test_missing_folders_name_the_key(hf_parts, tmp_path, key, path, message):
    config = omni_config(hf_parts)
    path = str(tmp_path) if path == "EMPTY" else path
    config = replace(config, **{key: replace(getattr(config, key), path=path)})
    with pytest.raises(ConfigError, match=message):
        OmniModel.from_config(config)


def test_wrong_kind_of_checkpoint_is_refused(hf_parts):
    config = omni_config(hf_parts)
    config = replace(config, audio=replace(config.audio, path=str(hf_parts / "qwen2")))
    with pytest.raises(ConfigError, match="audio: expected a Whisper model"):
        OmniModel.from_config(config)


def test_offline_mode_is_enforced():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


# --------------------------------------------------------------------------- placeholders

def test_placeholder_count_mismatch_names_modality_expected_and_got(omni_model):
    batch = make_batch(omni_model, [{"text": "Look: <image>", "images": [(64, 32)]}])  # 2 tiles + thumbnail
    batch["pixel_values"] = batch["pixel_values"][:1]  # two tiles fewer than the text expects
    with pytest.raises(PlaceholderCountError) as err:
        omni_model(**batch)
    per_tile = omni_model.vision.tokens_per_tile
    assert (err.value.modality, err.value.expected, err.value.got) == ("image", per_tile, 3 * per_tile)
    assert f"image: the encoders produced {per_tile} feature vectors but the text holds {3 * per_tile}" in str(err.value)


def test_media_without_placeholders_is_refused(omni_model):
    batch = make_batch(omni_model, [{"text": "What is said? <audio>", "audios": [16_000]}])
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == omni_model.token_ids["audio"], 65)
    with pytest.raises(PlaceholderCountError, match="audio: the encoders produced 13 feature vectors but the text holds 0"):
        omni_model(**batch)


def test_features_land_exactly_at_placeholder_positions(omni_model):
    batch = make_batch(omni_model, [MIXED[2]])
    media = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        embeds = omni_model.embed(batch["input_ids"], **media)
        image = omni_model.vision_adapter(omni_model.vision(batch["pixel_values"])).flatten(0, 1)
        audio = omni_model.audio_adapter(omni_model.audio(batch["audio_features"], batch["audio_valid_frames"]))
        text = omni_model.llm.get_input_embeddings()(batch["input_ids"])
    ids = batch["input_ids"]
    torch.testing.assert_close(embeds[ids == omni_model.token_ids["image"]], image)
    torch.testing.assert_close(embeds[ids == omni_model.token_ids["audio"]], audio)
    plain = (ids != omni_model.token_ids["image"]) & (ids != omni_model.token_ids["audio"])
    torch.testing.assert_close(embeds[plain], text[plain])


# --------------------------------------------------------------------------- training step

@pytest.mark.parametrize("samples", [
    [MIXED[0]], [MIXED[1]], [MIXED[2]], [MIXED[3]], [MIXED[4]], MIXED,
], ids=["image-only", "audio-only", "image+audio", "text-only", "video+image", "mixed"])
def test_forward_backward_reaches_every_used_component(hf_parts, samples):
    torch.manual_seed(0)
    model = OmniModel.from_config(omni_config(hf_parts)).train()
    batch = make_batch(model, samples)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    has = {k: any(k in s["text"] for s in samples) for k in ("<image>", "<video>", "<audio>")}
    uses_vision, uses_audio = has["<image>"] or has["<video>"], has["<audio>"]

    def got_grad(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert got_grad(model.llm)
    assert got_grad(model.vision) == uses_vision and got_grad(model.vision_adapter) == uses_vision
    assert got_grad(model.audio) == uses_audio and got_grad(model.audio_adapter) == uses_audio


def test_loss_only_on_labelled_tokens(omni_model):
    batch = make_batch(omni_model, [MIXED[3]])
    labels = batch["labels"].clone()
    labels[:, :10] = -100
    changed = batch["input_ids"].clone()
    changed[:, 1:5] = 66  # tokens whose next-token targets are unlabelled ...
    with torch.no_grad():
        a = omni_model(batch["input_ids"], labels=labels).loss
        b = omni_model(changed, labels=labels).loss
    assert not torch.isclose(a, b)  # ... still shape the context of later, labelled ones
    labels[:] = -100
    labels[:, -3:] = batch["input_ids"][:, -3:]
    with torch.no_grad():
        logits = omni_model(batch["input_ids"]).logits[0]
        loss = omni_model(batch["input_ids"], labels=labels).loss
    expected = torch.nn.functional.cross_entropy(logits[-4:-1], batch["input_ids"][0, -3:])
    torch.testing.assert_close(loss, expected)


def test_padding_does_not_change_a_sequence(omni_model):
    alone = make_batch(omni_model, [MIXED[0]])
    padded = make_batch(omni_model, [MIXED[0], {"text": MIXED[3]["text"] * 3}])
    with torch.no_grad():
        a = omni_model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0]
        b = omni_model(**{k: v for k, v in padded.items() if k != "labels"}).logits[0, : a.shape[0]]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_tile_positions_tag_each_token_of_a_tile_and_survive_save_load(hf_parts, tmp_path):
    config = omni_config(hf_parts)
    config.vision_adapter.tile_positions = True
    torch.manual_seed(0)
    model = OmniModel.from_config(config).eval()
    tokens = model.vision.tokens_per_tile
    assert model.vision_adapter.positions.shape == (tokens, model.llm.config.hidden_size)
    with torch.no_grad():
        model.vision_adapter.positions.normal_()
        same = torch.ones(2, tokens, model.vision.hidden_size)  # every token the same feature
        out = model.vision_adapter(same)
    assert torch.equal(out[0], out[1]) and not torch.allclose(out[0, 0], out[0, 1])  # per position, not per tile
    with pytest.raises(ValueError, match="tokens a tile"):
        model.vision_adapter(torch.ones(1, tokens + 1, model.vision.hidden_size))
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = OmniModel.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(reloaded.vision_adapter.positions, model.vision_adapter.positions)
    unpooled = OmniModel.from_pretrained(tmp_path / "ckpt", ["vision.pool=1"])  # 4x the tokens: the grid is resized
    assert unpooled.vision_adapter.positions.shape == (4 * tokens, model.llm.config.hidden_size)
    corner = unpooled.vision_adapter.positions[0]  # bilinear with edge clamping keeps the corner's vector
    torch.testing.assert_close(corner, model.vision_adapter.positions[0])
    config.audio_adapter.tile_positions = True
    with pytest.raises(ConfigError, match="audio_adapter.tile_positions"):
        OmniModel.from_config(config)


def test_time_positions_tag_each_video_frame_by_its_share_of_the_clip(hf_parts, tmp_path):
    config = omni_config(hf_parts)
    config.vision_adapter.time_positions = 4
    torch.manual_seed(0)
    model = OmniModel.from_config(config).eval()
    with torch.no_grad():
        model.vision_adapter.time_positions.normal_()
    batch = make_batch(model, [MIXED[4]])  # a 3-frame video at 0, 1/3, 2/3 of the clip, then an image
    torch.testing.assert_close(batch["video_frame_times"], torch.tensor([0, 1 / 3, 2 / 3]))
    media = {k: v for k, v in batch.items() if k not in ("attention_mask", "labels")}
    video = batch["input_ids"][0] == model.token_ids["video"]
    image = batch["input_ids"][0] == model.token_ids["image"]
    with torch.no_grad():
        forward = model.embed(**media)[0]
        backward = model.embed(**{**media, "video_frame_times": media["video_frame_times"].flip(0)})[0]
        timeless = OmniModel.from_config(omni_config(hf_parts))
        timeless.load_state_dict(model.state_dict(), strict=False)
        untagged = timeless.eval().embed(**media)[0]
    slots = torch.tensor([0, 1, 2]).repeat_interleave(model.vision.tokens_per_tile)  # each frame, every token
    torch.testing.assert_close(forward[video] - untagged[video], model.vision_adapter.time_positions[slots])
    assert not torch.allclose(forward[video], backward[video])
    torch.testing.assert_close(forward[image], backward[image])  # images have no timeline
    with pytest.raises(ValueError, match="video_frame_times"):
        model.embed(**{k: v for k, v in media.items() if k != "video_frame_times"})
    model.run_all_encoders = True  # as under DDP: a batch without video still reaches the timeline
    model(**make_batch(model, [MIXED[0]])).loss.backward()
    assert model.vision_adapter.time_positions.grad is not None
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = OmniModel.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(reloaded.vision_adapter.time_positions, model.vision_adapter.time_positions)
    config.audio_adapter.time_positions = 4
    with pytest.raises(ConfigError, match="audio_adapter.time_positions"):
        OmniModel.from_config(config)


def test_ctc_posteriors_mix_llm_embeddings_and_survive_save_load(hf_parts, tmp_path):
    tower = shutil.copytree(hf_parts / "whisper", tmp_path / "whisper")
    config = omni_config(hf_parts)
    config.audio.path, config.audio.ctc_posteriors = str(tower), True
    with pytest.raises(ConfigError, match="ctc_head.safetensors"):
        OmniModel.from_config(config)
    d_model, vocab, token = 32, 40, 7
    bias = torch.zeros(vocab + 1)
    bias[token] = 50.0  # every frame reads `token`, whatever it hears
    save_file({"weight": torch.zeros(vocab + 1, d_model), "bias": bias}, tower / "ctc_head.safetensors")
    torch.manual_seed(0)
    model = OmniModel.from_config(config).eval()
    assert not any("ctc" in name for name, _ in model.named_parameters())  # buffers: never trained
    audio = model.audio
    features = torch.randn(1, audio.num_mel_bins, audio.geometry.window_frames)
    valid = torch.tensor([audio.geometry.window_frames])
    with torch.no_grad():
        tokens = model._audio_tokens(features, valid)
    expected = audio.geometry.stack * model.llm.get_input_embeddings().weight[token]
    # the MLP starts at zero, so each audio token is its frames' posterior-weighted embeddings
    torch.testing.assert_close(tokens, expected.expand_as(tokens))
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "audio" / "ctc_head.safetensors").is_file()
    with torch.no_grad():
        torch.testing.assert_close(OmniModel.from_pretrained(tmp_path / "ckpt")._audio_tokens(features, valid), tokens)


# --------------------------------------------------------------------------- save / load

def test_save_load_round_trip_gives_identical_logits(omni_model, tmp_path):
    batch = make_batch(omni_model, MIXED)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    omni_model.save_pretrained(tmp_path / "ckpt")
    reloaded = OmniModel.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, omni_model(**inputs).logits, rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "adapters.safetensors", "audio", "config.yaml", "llm", "vision"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_adapter_of_another_shape_is_refused_naming_file_tensor_and_shapes(omni_model, tmp_path):
    omni_model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'ckpt' / 'adapters.safetensors'}: tensor audio_adapter.layers.0.bias has shape (48,), "
            "the configured model expects (64,)")):
        OmniModel.from_pretrained(tmp_path / "ckpt", ["audio_adapter.hidden_size=64"])


def test_saved_llm_folder_is_a_plain_hf_causal_lm(omni_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    omni_model.save_pretrained(tmp_path / "ckpt")
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "llm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt" / "llm")
    assert "<image>" in tokenizer.get_vocab() and llm.get_input_embeddings().num_embeddings >= len(tokenizer)


def test_save_replaces_an_existing_checkpoint(omni_model, tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    omni_model.save_pretrained(target)
    assert not (target / "stale.txt").exists() and (target / "config.yaml").exists()


def test_loading_a_non_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="not an omniforge checkpoint"):
        OmniModel.from_pretrained(tmp_path)


def test_tiny_preset_trains_a_mixed_batch_of_8(tmp_path):
    torch.manual_seed(0)
    model = OmniModel.from_config(load_config("recipes/models/tiny.yaml")).train()
    batch = make_batch(model, (MIXED * 2)[:8])
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_packed_attention_equals_causal_attention_per_sample_across_rows_and_gqa():
    from types import SimpleNamespace

    import torch.nn.functional as F

    from omniforge.model.attention import packed_sdpa_attention

    torch.manual_seed(0)
    rows, heads, kv_heads, length, dim = 2, 4, 2, 12, 8
    q = torch.randn(rows, heads, length, dim)
    k, v = torch.randn(rows, kv_heads, length, dim), torch.randn(rows, kv_heads, length, dim)
    cu = torch.tensor([0, 5, 12, 15, 24])  # over the flattened rows: the third sample starts row 2
    out, _ = packed_sdpa_attention(SimpleNamespace(training=False), q, k, v, None, cu_seq_lens_q=cu)
    assert out.shape == (rows, length, heads, dim)
    flat = [t.transpose(0, 1).reshape(t.shape[1], rows * length, dim) for t in (q, k, v)]
    expected = torch.cat([F.scaled_dot_product_attention(*(t[:, a:b] for t in flat), is_causal=True, enable_gqa=True)
                          for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
    torch.testing.assert_close(out, expected.reshape(heads, rows, length, dim).permute(1, 2, 0, 3))
    with pytest.raises(NotImplementedError, match="sliding-window"):
        packed_sdpa_attention(SimpleNamespace(training=False), q, k, v, None, cu_seq_lens_q=cu, sliding_window=4)
