"""Typed configuration: one omni model config with a sub-config per part.

Configs are plain dataclasses. They load from YAML, take dotted command-line overrides
(`llm.path=/x vision.max_tiles=4`) and are validated at load time with errors that name
the offending key. `save_config` writes the same YAML beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from omniforge.errors import ConfigError
from omniforge.processing.video import FrameSampling

# --------------------------------------------------------------------------- the parts


@dataclass
class VisionConfig:
    """Vision tower (any HF vision transformer) and the tiling of images into its input."""

    path: str | None = None
    """Local Hugging Face folder: SigLIP or CLIP, full checkpoint or vision-only."""
    arch: dict[str, Any] | None = None
    """HF config kwargs with `model_type`, for a randomly initialised tower (no `path`)."""
    tile_size: int = 448
    """Tile side in pixels; position embeddings are interpolated when the tower's is different."""
    patch_size: int | None = None
    """Patch side in pixels; read from the tower when None (set it to size budgets without weights)."""
    pool: int = 2
    """Bilinear downsampling factor of the patch grid per side (2: 1024 -> 256 tokens; 1: off)."""
    feature_layer: int = -1
    """Hidden-state index taken from the tower (-1: last layer, -2: the one before)."""
    min_tiles: int = 1
    """Fewest tiles an image is split into."""
    max_tiles: int = 9
    """Most tiles an image is split into (a thumbnail tile is added when more than one)."""

    def validate(self, key: str) -> None:
        _exactly_one_source(self, key)
        require(self.tile_size > 0, f"{key}.tile_size", "must be > 0")
        require(self.pool >= 1, f"{key}.pool", "must be >= 1 (1 turns pooling off)")
        require(1 <= self.min_tiles <= self.max_tiles, f"{key}.min_tiles",
               f"must satisfy 1 <= min_tiles <= max_tiles, got {self.min_tiles} and {self.max_tiles}")
        if self.patch_size is not None:
            require(self.patch_size > 0 and self.tile_size % self.patch_size == 0, f"{key}.patch_size",
                   f"must divide tile_size={self.tile_size}, got {self.patch_size}")


@dataclass
class AudioConfig:
    """Audio tower (a Whisper encoder) and the rate of audio tokens fed to the LLM."""

    path: str | None = None
    """Local Hugging Face folder of a Whisper model (only the encoder weights are read)."""
    arch: dict[str, Any] | None = None
    """HF Whisper config kwargs for a randomly initialised encoder (no `path`)."""
    tokens_per_second: float = 12.5
    """LLM tokens per second of audio; the encoder's 50 frames/s are stacked by 50/this."""
    ctc_posteriors: bool = False
    """Add to each audio token the LLM input embeddings weighted by the encoder's CTC posteriors
    over the LLM's vocabulary, summed over the token's frames (LegoSLM), so audio arrives
    looking like text; the adapter's MLP then starts at zero and learns the rest. Needs the
    CTC head in the folder (`ctc_head.safetensors`, written by `omniforge encoders`)."""
    trim_seconds: float | None = None
    """Encode each window's audio only, rounded up to a multiple of this many seconds, not the
    whole zero-padded window. None for a real Whisper (trained on whole 30-s windows); set it to
    what the tower was pretrained with (the micro stand-in: recipes/micro_encoders.yaml)."""

    def validate(self, key: str) -> None:
        _exactly_one_source(self, key)
        require(self.trim_seconds is None or self.trim_seconds > 0, f"{key}.trim_seconds",
                f"must be > 0 seconds or null, got {self.trim_seconds}")
        stack = 50 / self.tokens_per_second if self.tokens_per_second > 0 else 0
        require(stack >= 1 and abs(stack - round(stack)) < 1e-9, f"{key}.tokens_per_second",
               f"must divide 50 (the encoder's frame rate), got {self.tokens_per_second}")


@dataclass
class AdapterConfig:
    """MLP that maps encoder features into the LLM's embedding space."""

    num_layers: int = 2
    """Linear layers (>= 1); a GELU sits between consecutive ones."""
    hidden_size: int | None = None
    """Width of the hidden layers; the LLM's hidden size when None."""
    tile_positions: bool = False
    """Vision only: add a learned embedding per token position within a tile or frame, so the LLM
    knows where a token lies (the tower's own position signal fades with depth)."""
    time_positions: int = 0
    """Vision only: this many learned vectors along a clip's timeline; every token of a video frame
    gets the one at the frame's relative time (timestamp / duration), so the LLM can tell early
    frames from late ones by content, not only by how far back they lie. 0: none."""

    def validate(self, key: str) -> None:
        require(self.num_layers >= 1, f"{key}.num_layers", "must be >= 1")
        require(self.time_positions >= 0, f"{key}.time_positions", "must be >= 0")
        require(self.hidden_size is None or self.hidden_size > 0, f"{key}.hidden_size", "must be > 0")


@dataclass
class LLMConfig:
    """The causal language model (any HF `AutoModelForCausalLM`) and its tokenizer."""

    path: str | None = None
    """Local Hugging Face folder of the LLM (Qwen2/2.5, Llama, ...)."""
    arch: dict[str, Any] | None = None
    """HF config kwargs with `model_type`, for a randomly initialised LLM (no `path`)."""
    tokenizer: str | None = None
    """Tokenizer folder; `llm.path` when None; `byte-level` builds a 256-byte tokenizer."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of the whole model."""
    attention: str = "omniforge_sdpa"
    """Attention kernel: `omniforge_sdpa` (SDPA; packed rows cost sum(n_i^2)), or a transformers
    one such as `flash_attention_2` (GPU varlen) or `sdpa`."""

    def validate(self, key: str) -> None:
        _exactly_one_source(self, key)
        require(self.path is not None or self.tokenizer is not None, f"{key}.tokenizer",
               "is required when the LLM is built from `arch` (a folder, or `byte-level`)")


@dataclass
class SpecialTokens:
    """Placeholder and state tokens added to the LLM's tokenizer."""

    image: str = "<image>"
    """Placeholder for one image; expanded to one token per image feature."""
    video: str = "<video>"
    """Placeholder for one video; expanded to one token per frame feature."""
    audio: str = "<audio>"
    """Placeholder for one audio clip; expanded to one token per audio feature."""
    state_text: str = "<|state_text|>"
    """Starts the assistant turn after a text query (VITA's <3>)."""
    state_speech: str = "<|state_speech|>"
    """Starts the assistant turn after a spoken query (VITA's <1>)."""
    state_background: str = "<|state_background|>"
    """Starts the assistant turn after audio not meant for the assistant (VITA's <2>): no answer."""
    heard: str = "<|heard|>"
    """Opens what the assistant heard of a spoken query, said before its answer (SpeechGPT's chain
    of modality): the answer then reads the question as text."""
    heard_end: str = "<|/heard|>"
    """Closes what the assistant heard; the answer follows."""

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def validate(self, key: str) -> None:
        tokens = self.all()
        require(all(tokens), key, "no special token may be empty")
        require(len(set(tokens)) == len(tokens), key, f"special tokens must be distinct, got {tokens}")


@dataclass
class ChatConfig:
    """How conversations are rendered: a system prompt per data type (as in VITA)."""

    system_image: str = "You are an assistant that sees images. Answer about the image."
    system_video: str = "You are an assistant that watches videos. Answer about the video."
    system_audio: str = "You are an assistant that hears audio. Answer the speaker or about the audio."
    system_text: str = "You are a helpful assistant."

    def system_prompt(self, data_type: str) -> str:
        return getattr(self, f"system_{data_type}")


@dataclass
class OmniConfig:
    """The whole omni model: towers, adapters, LLM, special tokens. `vision`/`audio` may be null."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig | None = None
    vision_adapter: AdapterConfig = field(default_factory=AdapterConfig)
    audio: AudioConfig | None = None
    audio_adapter: AdapterConfig = field(default_factory=AdapterConfig)
    tokens: SpecialTokens = field(default_factory=SpecialTokens)
    video: FrameSampling = field(default_factory=FrameSampling)
    chat: ChatConfig = field(default_factory=ChatConfig)


# --------------------------------------------------------------------------- load / save

T = typing.TypeVar("T")


def load_config(path: str | Path, overrides: list[str] = (), cls: type[T] = OmniConfig) -> T:
    """Read a YAML file into `cls`, applying dotted `key=value` overrides first.

    Errors name the file and the key: `model.yaml: vision.pool: expected int, got 'two'`.
    """
    path = Path(path)
    data = read_yaml(path, "config")
    try:
        return from_dict(cls, apply_overrides(data, overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `2e-3` as a float, as YAML 1.2 does (PyYAML's YAML 1.1 wants `2.0e-3`
    and would hand a learning rate over as a string)."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                  list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """Safe YAML, with `2e-3` read as a float: for config files, recipes and override values."""
    return yaml.load(text, Loader=_YamlLoader)


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """The mapping in a YAML file; errors name the file (`what`: "config", "recipe", ...)."""
    try:
        data = parse_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top of the {what}")
    return data


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b.c=value` set; values are parsed as YAML.

    A list is addressed by index or, when its items are named, by name: `stages.0.steps=10`
    and `stages.3_cross_modal.steps=10` set the same field of a recipe whose first stage is
    `3_cross_modal`."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        node: Any = data
        parts = key.split(".")
        for i, part in enumerate(parts):
            where = ".".join(parts[:i + 1])
            if isinstance(node, list):
                part = _list_index(node, part, f"override {item!r}: {where}")
            elif not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is not a section")
            if i == len(parts) - 1:
                node[part] = parse_yaml(raw) if raw.strip() else None
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return data


def _list_index(items: list, part: str, where: str) -> int:
    """The position `part` names in `items`: an index in range, or the name of a named item."""
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if part.isdigit() and int(part) < len(items):
        return int(part)
    if part in names:
        return names.index(part)
    named = f" or one of {', '.join(map(str, names))}" if any(names) else ""
    raise ConfigError(f"{where}: expected an index 0-{len(items) - 1}{named}")


def from_dict(cls: type[T], data: Any, key: str = "") -> T:
    """Build dataclass `cls` from a mapping, type-checking every field; calls `validate`."""
    where = key or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        full = f"{key}.{name}" if key else str(name)
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{full}: unknown key{hint}")
        kwargs[name] = _coerce(hints[name], value, full)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: expected {_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, {} if value is None else value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0] if args else Any, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{key}: expected {_name(tp)}, got {value!r}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _exactly_one_source(part: Any, key: str) -> None:
    require((part.path is None) != (part.arch is None), key,
           "set exactly one of `path` (pretrained folder) or `arch` (random init)")
    if part.arch is not None:
        require(isinstance(part.arch.get("model_type"), str), f"{key}.arch.model_type",
               "is required (a string such as qwen2, llama, siglip_vision_model, whisper)")


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
