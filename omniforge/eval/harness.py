"""Model classes for the field's evaluation harnesses, wrapping an omniforge checkpoint.

**lmms-eval** (`OmniforgeLmms`, an `lmms_eval.api.model.lmms`, "simple" request format).
Register it by adding one line to `AVAILABLE_MODELS` in `lmms_eval/models/__init__.py` (a
dotted path is imported as is), then run it like any model:

    "omniforge": "omniforge.eval.harness.OmniforgeLmms",

    python -m lmms_eval --model omniforge --model_args checkpoint=runs/ckpt,batch_size=8 --tasks mme,mmbench_en_dev

Importing this module also registers the name `omniforge` with `register_model`, for Python
use: `lmms_eval.evaluator.simple_evaluate(model=OmniforgeLmms(checkpoint=...), tasks=[...])`.

**VLMEvalKit** (`OmniforgeVLM`, a `vlmeval.vlm.base.BaseModel`, interleaved messages). Register
it in `vlmeval/config.py`, then `python run.py --model omniforge --data MMBench_DEV_EN MME`:

    from omniforge.eval.harness import OmniforgeVLM
    supported_VLM["omniforge"] = partial(OmniforgeVLM, checkpoint="runs/ckpt")

Neither harness is a dependency (both pull CUDA builds of torch). Their base classes are
imported when this module is; where a harness is not installed a stand-in base with the same
contract takes its place, so the adapters can be used and tested without it.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omniforge.errors import OmniforgeError
from omniforge.eval.runner import Prompt, answer_prompts
from omniforge.model.generate import GenerationConfig
from omniforge.processing.audio import resample
from omniforge.processing.chat import IGNORE, OmniProcessor
from omniforge.processing.media import media_kind

log = logging.getLogger(__name__)


class _LmmsStandIn:
    """What the adapter uses of `lmms_eval.api.model.lmms`, for when lmms-eval is not installed."""

    def __init__(self) -> None:
        self._rank, self._world_size = 0, 1
        self.task_dict: dict = {}
        """task -> split -> docs; lmms-eval fills it before calling the model."""

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size


class _VLMStandIn:
    """VLMEvalKit's `BaseModel` contract, for when it is not installed: `generate` checks the
    message (a string, or a list of {"type", "value"}) and calls `generate_inner`."""

    INTERLEAVE = False
    allowed_types = ["text", "image"]

    def use_custom_prompt(self, dataset: str) -> bool:
        return False

    def generate(self, message, dataset: str | None = None) -> str:
        if isinstance(message, str):
            message = [{"type": "text", "value": message}]
        for item in message:
            if item.get("type") not in self.allowed_types:
                raise ValueError(f"Invalid input type: {item.get('type')}")
        return self.generate_inner(message, dataset)


try:
    from lmms_eval.api.model import lmms as _LmmsBase
    from lmms_eval.api.registry import register_model
except ImportError:
    _LmmsBase = _LmmsStandIn

    def register_model(*names):
        return lambda cls: cls

try:
    from vlmeval.vlm.base import BaseModel as _VLMBase
except ImportError:
    _VLMBase = _VLMStandIn


class OmniforgeChat:
    """A checkpoint answering one-turn prompts with media: what both adapters share."""

    def __init__(self, checkpoint: str | Path | None = None, model=None, device: str | None = None):
        if model is None:
            from omniforge.model.omni import OmniModel

            if checkpoint is None:
                raise OmniforgeError("give a checkpoint folder (or a loaded model)")
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = OmniModel.from_pretrained(checkpoint).to(device)
        self.model = model.eval()
        self.processor = OmniProcessor.from_model(model)
        self.placeholders = {m: getattr(model.config.tokens, m) for m in ("image", "video", "audio")}

    def prompt(self, text: str, media: list[tuple[str, Any]]) -> tuple[list[dict], dict[str, list]]:
        """Messages and media for `text` with `media` ((modality, source) pairs): placeholders go
        before the text, unless the text already holds them."""
        by_modality = {m: [source for kind, source in media if kind == m] for m in self.placeholders}
        if media and not any(p in text for p in self.placeholders.values()):
            text = "".join(self.placeholders[kind] for kind, _ in media) + "\n" + text
        return [{"role": "user", "content": text}], by_modality

    def answer(self, prompts: list[tuple[str, list[tuple[str, Any]]]], config: GenerationConfig) -> list[str]:
        """Greedy (or sampled, per `config`) answers; a prompt whose media fail to load answers ""."""
        questions = [Prompt(*self.prompt(text, media), system=None, where=f"request {i}")
                     for i, (text, media) in enumerate(prompts)]
        answers = answer_prompts(self.model, self.processor, questions, config)
        for failed in (a for a in answers if isinstance(a, OmniforgeError)):
            log.warning("answering '' to a request that cannot be encoded: %s", failed)
        return ["" if isinstance(a, OmniforgeError) else a.text for a in answers]

    @torch.no_grad()
    def loglikelihood(self, text: str, media: list[tuple[str, Any]], continuation: str) -> tuple[float, bool]:
        """log p(continuation | prompt) as the assistant's answer, and whether greedy decoding would produce it."""
        messages, by_modality = self.prompt(text, media)
        full = self.processor.encode(messages + [{"role": "assistant", "content": continuation}], by_modality,
                                     where="loglikelihood request")
        start = next(i for i, label in enumerate(full.labels) if label != IGNORE) + 1  # after the state token
        count = len(self.model.tokenizer(continuation, add_special_tokens=False).input_ids)
        inputs = self.processor.collate([full])
        inputs.pop("labels")
        logits = self.model(**{k: v.to(self.model.device) for k, v in inputs.items()}).logits[0].float()
        targets = torch.tensor(full.input_ids[start:start + count], device=logits.device)
        predicted = logits[start - 1:start - 1 + count]  # the logits at position t predict token t + 1
        logprob = predicted.log_softmax(-1).gather(1, targets[:, None]).sum()
        return float(logprob), bool((predicted.argmax(-1) == targets).all())


def generation_config(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> GenerationConfig:
    """lmms-eval's generation kwargs (until, max_new_tokens, do_sample, temperature, top_p) as a GenerationConfig."""
    until = gen_kwargs.get("until") or []
    sampled = bool(gen_kwargs.get("do_sample")) or float(gen_kwargs.get("temperature") or 0) > 0
    return GenerationConfig(max_new_tokens=int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
                            temperature=float(gen_kwargs.get("temperature") or 1.0) if sampled else 0.0,
                            top_p=float(gen_kwargs.get("top_p") or 1.0),
                            stop=[until] if isinstance(until, str) else list(until))


def media_item(visual) -> tuple[str, Any]:
    """(modality, source) of one lmms-eval visual: a PIL image, a video/audio/image path, or an
    audio dict {"array", "sampling_rate"} (resampled to 16 kHz mono)."""
    if isinstance(visual, dict) and "array" in visual:
        waveform = np.asarray(visual["array"], dtype=np.float32)
        if waveform.ndim == 2:  # channels are the shorter axis, first or last
            waveform = waveform.mean(axis=int(np.argmin(waveform.shape)))
        return "audio", resample(waveform, int(visual.get("sampling_rate", 16_000)), 16_000)
    if isinstance(visual, (str, Path)):
        return media_kind(visual, default="image"), str(visual)
    return "image", visual


@register_model("omniforge")
class OmniforgeLmms(_LmmsBase):
    """lmms-eval model `omniforge`: `--model_args checkpoint=DIR[,batch_size=N,max_new_tokens=N,device=D]`."""

    def __init__(self, checkpoint: str | None = None, batch_size: int | str = 1, max_new_tokens: int | str = 256,
                 device: str | None = None, model=None, **unused) -> None:
        super().__init__()
        if unused:
            log.warning("omniforge: ignoring model_args %s", sorted(unused))
        self.chat = OmniforgeChat(checkpoint, model, device)
        self.batch_size_per_gpu, self.max_new_tokens = int(batch_size), int(max_new_tokens)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.chat.model.device

    def _prompt(self, context: str, doc_to_visual, doc_id, task: str, split: str) -> tuple[str, list[tuple[str, Any]]]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        if not isinstance(visuals, (list, tuple)):  # a task may return one visual, or None
            visuals = [] if visuals is None else [visuals]
        return context, [media_item(v) for v in visuals]

    def generate_until(self, requests) -> list[str]:
        """Answers to requests with args (context, gen_kwargs, doc_to_visual, doc_id, task, split), in order.

        Consecutive requests with the same generation kwargs are batched together.
        """
        answers = []
        for _, group in itertools.groupby(requests, key=lambda r: repr(sorted(r.args[1].items()))):
            group = list(group)
            config = generation_config(group[0].args[1], self.max_new_tokens)
            for start in range(0, len(group), self.batch_size):
                answers += self.chat.answer([self._prompt(r.args[0], *r.args[2:]) for r in group[start:start + self.batch_size]],
                                            config)
        return answers

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log p(continuation), is greedy) for requests with args (context, doc_to_target, doc_to_visual,
        doc_id, task, split); doc_to_target is the continuation, or a function of the doc giving it."""
        results = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            target = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(self.task_dict[task][split][doc_id])
            results.append(self.chat.loglikelihood(*self._prompt(context, doc_to_visual, doc_id, task, split), target))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("omniforge: multi-round generation is not supported")


class OmniforgeVLM(_VLMBase):
    """VLMEvalKit model: messages are lists of {"type": text|image|video|audio, "value": text or path}, in order."""

    INTERLEAVE = True
    allowed_types = ["text", "image", "video", "audio"]

    def __init__(self, checkpoint: str | None = None, max_new_tokens: int = 512, device: str | None = None,
                 model=None, **unused) -> None:
        if unused:
            log.warning("omniforge: ignoring arguments %s", sorted(unused))
        self.chat = OmniforgeChat(checkpoint, model, device)
        self.max_new_tokens = max_new_tokens

    def generate_inner(self, message: list[dict[str, str]], dataset: str | None = None) -> str:
        """Text items joined by newlines, each media item a placeholder where it stands."""
        parts, media = [], []
        for item in message:
            if item["type"] == "text":
                parts.append(item["value"])
            else:
                parts.append(self.chat.placeholders[item["type"]])
                media.append((item["type"], item["value"]))
        return self.chat.answer([("\n".join(parts), media)], GenerationConfig(max_new_tokens=self.max_new_tokens))[0]
