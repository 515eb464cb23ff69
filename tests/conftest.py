"""Shared fixtures: tiny random Hugging Face checkpoints, written with `save_pretrained`.

Every folder is what the real thing looks like on disk (full SigLIP/CLIP with a text tower,
a full Whisper with its decoder, a causal LM with its tokenizer), only tiny, so the tests
exercise the same loading path as siglip-so400m, whisper-large-v3 and Qwen2.5-7B.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import omniforge  # noqa: F401  (sets offline mode before transformers is imported)
from omniforge.config import AdapterConfig, AudioConfig, LLMConfig, OmniConfig, VisionConfig
from omniforge.model.omni import OmniModel
from omniforge.model.tokenizer import byte_level_tokenizer

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8)
TINY_LLM = dict(vocab_size=272, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _save_siglip(folder):
    from transformers import SiglipConfig, SiglipModel

    SiglipModel(SiglipConfig(vision_config=TINY_VISION, text_config=TINY_TEXT)).save_pretrained(folder)


def _save_clip(folder):
    from transformers import CLIPConfig, CLIPModel

    CLIPModel(CLIPConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, projection_dim=16)).save_pretrained(folder)


def _save_whisper(folder, num_mel_bins=80):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           num_mel_bins=num_mel_bins, max_source_positions=100, max_target_positions=32,
                           vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperForConditionalGeneration(config).save_pretrained(folder)


def _save_llm(folder, model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **TINY_LLM, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)


@pytest.fixture(scope="session")
def hf_parts(tmp_path_factory):
    """Folders of tiny random checkpoints, one per supported part."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    _save_siglip(root / "siglip")
    _save_clip(root / "clip")
    _save_whisper(root / "whisper")
    _save_whisper(root / "whisper128", num_mel_bins=128)
    _save_llm(root / "qwen2", "qwen2")
    _save_llm(root / "llama", "llama")
    return root


def omni_config(hf_parts, llm="qwen2", vision="siglip", audio="whisper", tile_size=32, pool=2) -> OmniConfig:
    return OmniConfig(
        llm=LLMConfig(path=str(hf_parts / llm)),
        vision=VisionConfig(path=str(hf_parts / vision), tile_size=tile_size, pool=pool) if vision else None,
        audio=AudioConfig(path=str(hf_parts / audio)) if audio else None,
        vision_adapter=AdapterConfig(), audio_adapter=AdapterConfig(),
    )


@pytest.fixture(scope="session")
def omni_model(hf_parts) -> OmniModel:
    torch.manual_seed(0)
    return OmniModel.from_config(omni_config(hf_parts)).eval()


def make_batch(model: OmniModel, samples: list[dict], padding_side: str = "right", seed: int = 0,
               generation: bool = False) -> dict:
    """A batch built by the real processor from random media, one user turn per sample.

    Each sample: {"text": "... <image> ... <audio> ...", "images": [(w, h) per image],
    "videos": [frames per video], "audios": [samples per clip]}. Without `generation` an
    assistant answer ("ok") follows, so labels are non-empty.
    """
    from PIL import Image

    from omniforge.processing.chat import OmniProcessor
    from omniforge.processing.video import Video

    rng = np.random.default_rng(seed)

    def picture(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    processor = OmniProcessor.from_model(model)
    encoded = []
    for s in samples:
        media = {"image": [picture(*size) for size in s.get("images", [])],
                 "video": [Video([picture(40, 30) for _ in range(n)], list(range(n)), float(n)) for n in s.get("videos", [])],
                 "audio": [rng.normal(0, 0.1, n).astype(np.float32) for n in s.get("audios", [])]}
        messages = [{"role": "user", "content": s["text"]}]
        if not generation:
            messages.append({"role": "assistant", "content": "ok"})
        encoded.append(processor.encode(messages, media, system="", add_generation_prompt=generation))
    return processor.collate(encoded, padding_side)
