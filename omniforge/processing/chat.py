"""Conversations -> token ids, labels and encoder inputs: what the omni model consumes.

Two input formats, both first-class:

* the JSONL training format, placeholders in the text and media lists beside it:
  `{"messages": [{"role": "user", "content": "<image>\\nWhat is this?"},
                 {"role": "assistant", "content": "A red circle."}],
    "images": ["a.png"], "videos": [], "audios": [], "system": "optional"}`
* OpenAI chat messages with content parts (`text`, `image_url`, `input_audio`, `video_url`).

Rendering uses the LLM's own chat template (ChatML when it has none), a system prompt per
data type (video > image > audio > text), and starts every assistant turn with a state token:
`state_speech` when the user turn was only speech, `state_background` for audio not meant for
the assistant (the answer is empty), `state_text` otherwise; an assistant message may name
its `state` explicitly, and an answer to a spoken query what it `heard` (a transcript, framed by
the `heard` tokens before the answer, so that the answer reads the question as text). Labels
cover assistant turns only; each placeholder is expanded to exactly the number of features its
media yields.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omniforge.config import OmniConfig
from omniforge.errors import OmniforgeError, PlaceholderCountError
from omniforge.processing.media import MediaItem, MediaProcessor

IGNORE = -100
MODALITIES = ("image", "video", "audio")
STATES = ("text", "speech", "background")


class ConversationError(OmniforgeError, ValueError):
    """A conversation record is malformed (roles, content types, fields); the message says where."""


@dataclass
class Encoded:
    """One conversation, ready to batch."""

    input_ids: list[int]
    labels: list[int]
    """IGNORE (-100) outside assistant turns and at placeholders."""
    media: list[MediaItem] = field(default_factory=list)
    """In placeholder order."""
    data_type: str = "text"

    def __len__(self) -> int:
        return len(self.input_ids)


class OmniProcessor:
    """Tokenizer + media processor + chat rules for one omni model."""

    def __init__(self, tokenizer, config: OmniConfig, media: MediaProcessor):
        self.tokenizer, self.config, self.media = tokenizer, config, media
        vocab = tokenizer.get_vocab()
        self.placeholder_ids = {m: vocab[getattr(config.tokens, m)] for m in MODALITIES}

    @classmethod
    def from_model(cls, model) -> "OmniProcessor":
        return cls(model.tokenizer, model.config, MediaProcessor.from_config(model.config))

    # ------------------------------------------------------------------ formats

    def encode_record(self, record: dict[str, Any], base_dir: str | Path | None = None,
                      where: str = "sample") -> Encoded:
        """A JSONL training record; relative media paths resolve against `base_dir`."""
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise ConversationError(f"{where}: expected an object with a 'messages' list")
        return self.encode(record["messages"], record_media(record, base_dir, where), system=record.get("system"),
                           where=where)

    def encode_openai(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                      where: str = "request") -> Encoded:
        """OpenAI chat messages; content parts become placeholders and media, in order."""
        converted, media = [], {m: [] for m in MODALITIES}
        system = None
        for i, message in enumerate(messages):
            content = message.get("content")
            if isinstance(content, list):
                text = []
                for j, part in enumerate(content):
                    modality, value = _openai_part(part, f"{where}.messages[{i}].content[{j}]")
                    if modality == "text":
                        text.append(value)
                    else:
                        text.append(getattr(self.config.tokens, modality))
                        media[modality].append(value)
                content = "".join(text)
            if message.get("role") == "system":
                system = content
                continue
            converted.append({**message, "content": content})
        return self.encode(converted, media, system=system, add_generation_prompt=add_generation_prompt, where=where)

    # ------------------------------------------------------------------ the core

    def encode(self, messages: list[dict[str, Any]], media: dict[str, list] | None = None,
               system: str | None = None, add_generation_prompt: bool = False, where: str = "sample") -> Encoded:
        """Render, tokenise and label `messages`; `media` maps modality -> sources in order."""
        media = {m: list((media or {}).get(m, [])) for m in MODALITIES}
        tokens = self.config.tokens
        _check_messages(messages, where)
        if system is not None and not isinstance(system, str):
            raise ConversationError(f"{where}.system: expected a string or null, got {type(system).__name__}")
        for modality in MODALITIES:
            placeholder = getattr(tokens, modality)
            found = sum(str(m["content"] or "").count(placeholder) for m in messages)
            if found != len(media[modality]):
                raise PlaceholderCountError(modality, expected=len(media[modality]), got=found, message=(
                    f"{where}: {found} {placeholder} placeholder(s) in the messages but "
                    f"{len(media[modality])} {modality}(s) given"))
            if system and placeholder in system:
                raise ConversationError(f"{where}.system: holds {placeholder}; media placeholders belong in messages")
        data_type = next((m for m in ("video", "image", "audio") if media[m]), "text")
        if system is None:
            system = self.config.chat.system_prompt(data_type)
        rendered = [{"role": "system", "content": system}] if system else []
        for i, message in enumerate(messages):
            content = str(message["content"] or "")
            if message["role"] == "assistant":
                state = message.get("state") or _infer_state(messages[i - 1] if i else None, tokens)
                if state not in STATES:
                    raise ConversationError(f"{where}.messages[{i}].state: expected one of {STATES}, got {state!r}")
                heard = _heard(message, state, tokens, f"{where}.messages[{i}]")
                content = getattr(tokens, f"state_{state}") + heard + ("" if state == "background" else content)
            rendered.append({"role": message["role"], "content": content})
        text, spans = self._render(rendered, add_generation_prompt, where)
        ids, labels = self._tokenize(text, spans)
        for modality in MODALITIES:  # a chat template or a 'background' state may drop text that held some
            kept = ids.count(self.placeholder_ids[modality])
            if kept != len(media[modality]):
                raise PlaceholderCountError(modality, expected=len(media[modality]), got=kept, message=(
                    f"{where}: {kept} {getattr(tokens, modality)} placeholder(s) in the rendered conversation but "
                    f"{len(media[modality])} {modality}(s) given; text the chat drops (such as the answer of a "
                    "'background' assistant turn) cannot hold placeholders"))
        items = {m: [self._load(m, src, f"{where}.{m}s[{i}]") for i, src in enumerate(media[m])] for m in MODALITIES}
        ordered = _in_text_order(ids, self.placeholder_ids, items)
        return Encoded(*self._expand(ids, labels, ordered), media=ordered, data_type=data_type)

    def _load(self, modality: str, source, where: str) -> MediaItem:
        from omniforge.errors import MediaError

        try:
            return self.media.item(modality, source)
        except MediaError as e:
            e.args = (f"{where}: {e}",)
            raise

    def _render(self, messages: list[dict], add_generation_prompt: bool, where: str) -> tuple[str, list[tuple[int, int]]]:
        """The conversation text and the character spans of assistant turns (labelled)."""
        template = self.tokenizer.apply_chat_template
        spans, previous = [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = template(messages[: i + 1], tokenize=False)
            if not (prompt.startswith(previous) and full.startswith(prompt)):
                raise ConversationError(f"{where}: the chat template does not render conversations prefix by "
                                        "prefix, so assistant turns cannot be located for labels")
            spans.append((len(prompt), len(full)))
            previous = full
        text = template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return text, spans

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [IGNORE] * len(enc.input_ids)
        for i, (start, _end) in enumerate(enc.offset_mapping):
            if any(a <= start < b for a, b in spans):
                labels[i] = enc.input_ids[i]
        return list(enc.input_ids), labels

    def _expand(self, ids: list[int], labels: list[int], media: list[MediaItem]) -> tuple[list[int], list[int]]:
        """Each placeholder id repeated as many times as its media item has features."""
        counts = iter(media)
        placeholders = set(self.placeholder_ids.values())
        out_ids, out_labels = [], []
        for token, label in zip(ids, labels):
            if token in placeholders:
                n = next(counts).tokens
                out_ids.extend([token] * n)
                out_labels.extend([IGNORE] * n)
            else:
                out_ids.append(token)
                out_labels.append(label)
        return out_ids, out_labels

    # ------------------------------------------------------------------ batching

    def collate(self, samples: list[Encoded], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad to the longest sample; media concatenated in sample then placeholder order.

        Returns input_ids, attention_mask, labels (B, L) and, when present, pixel_values,
        pixel_values_videos, video_frame_times, audio_features, audio_valid_frames: the kwargs of
        `OmniModel`.
        """
        width = max(len(s) for s in samples)
        ids = torch.full((len(samples), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(samples):
            span = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
            ids[i, span] = torch.tensor(s.input_ids)
            labels[i, span] = torch.tensor(s.labels)
            mask[i, span] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        batch.update(collate_media([item for s in samples for item in s.media]))
        return batch


def collate_media(items: list[MediaItem]) -> dict[str, torch.Tensor]:
    """Encoder inputs of `items`, concatenated per kind in the order given."""
    out = {}
    for key, modality, attr in (("pixel_values", "image", "pixel_values"),
                                ("pixel_values_videos", "video", "pixel_values"),
                                ("video_frame_times", "video", "frame_times"),
                                ("audio_features", "audio", "audio_features"),
                                ("audio_valid_frames", "audio", "audio_valid_frames")):
        parts = [getattr(item, attr) for item in items if item.modality == modality]
        if parts:
            out[key] = torch.cat(parts)
    return out


def _check_messages(messages, where: str) -> None:
    if not messages:
        raise ConversationError(f"{where}.messages: empty conversation")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise ConversationError(f"{where}.messages[{i}]: expected a role of user, assistant or system")
        if m["role"] == "system":
            raise ConversationError(f"{where}.messages[{i}]: put the system prompt in the record's 'system' field")
        if m.get("content") is not None and not isinstance(m["content"], str):
            raise ConversationError(f"{where}.messages[{i}].content: expected a string")


def _heard(message: dict, state: str, tokens, where: str) -> str:
    """The assistant's `heard` (what it heard of a spoken query), framed by its tokens; "" without one."""
    heard = message.get("heard")
    if heard is None:
        return ""
    if not isinstance(heard, str):
        raise ConversationError(f"{where}.heard: expected a string (what was heard), got {type(heard).__name__}")
    if state != "speech":
        raise ConversationError(f"{where}.heard: only an answer to a spoken query says what it heard, "
                                f"but this turn's state is {state!r}")
    return tokens.heard + heard + tokens.heard_end


def _infer_state(user_message: dict | None, tokens) -> str:
    """`speech` when the user turn holds audio and no words (a spoken query), else `text`."""
    content = str((user_message or {}).get("content") or "")
    words = content
    for placeholder in (tokens.audio, tokens.image, tokens.video):
        words = words.replace(placeholder, "")
    return "speech" if tokens.audio in content and not words.strip() else "text"


def _in_text_order(ids: list[int], placeholder_ids: dict[str, int], items: dict[str, list]) -> list[MediaItem]:
    """Media items in the order their placeholders appear in the token sequence."""
    by_id = {v: k for k, v in placeholder_ids.items()}
    queues = {m: iter(items[m]) for m in MODALITIES}
    return [next(queues[by_id[t]]) for t in ids if t in by_id]


def record_media(record: dict[str, Any], base_dir: str | Path | None = None,
                 where: str = "sample") -> dict[str, list]:
    """A record's `images` / `videos` / `audios` lists by modality; relative paths resolve against `base_dir`."""
    media = {}
    for modality in MODALITIES:
        items = record.get(modality + "s", []) or []
        if not isinstance(items, list):
            raise ConversationError(f"{where}.{modality}s: expected a list of paths")
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise ConversationError(f"{where}.{modality}s[{i}]: expected a file path (a string), got {item!r:.40}")
        media[modality] = [_resolve(x, base_dir) for x in items]
    return media


def _resolve(path: str, base_dir) -> str:
    if base_dir is not None and not Path(path).is_absolute():
        return str(Path(base_dir) / path)
    return path


def _openai_part(part: Any, where: str) -> tuple[str, Any]:
    """(modality, value) of one OpenAI content part: text, or media as bytes or a path."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return "text", str(part.get("text", ""))
    if kind in ("image_url", "video_url"):
        url = (part.get(kind) or {}).get("url") if isinstance(part.get(kind), dict) else part.get(kind)
        if not isinstance(url, str):
            raise ConversationError(f"{where}.{kind}.url: expected a string")
        return kind.split("_")[0], _url_source(url, where)
    if kind == "input_audio":
        data = (part.get("input_audio") or {}).get("data")
        if not isinstance(data, str):
            raise ConversationError(f"{where}.input_audio.data: expected base64 audio")
        return "audio", _b64(data, where)
    raise ConversationError(f"{where}: unsupported content part type {kind!r} "
                            "(text, image_url, video_url, input_audio)")


def _url_source(url: str, where: str):
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ConversationError(f"{where}: data URI must be base64-encoded")
        return _b64(payload, where)
    if url.startswith("file://"):
        return url[len("file://"):]
    if "://" in url:
        raise ConversationError(f"{where}: only data: URIs and local paths are read (no network), got {url[:40]!r}")
    return url


def _b64(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise ConversationError(f"{where}: invalid base64 data") from None
