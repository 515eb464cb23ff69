"""Held-out sets watched while training: every modality's score, as it changes (forgetting monitor)."""

from __future__ import annotations

import torch

from omniforge.data.dataset import JsonlConversations
from omniforge.errors import OmniforgeError
from omniforge.eval.metrics import normalize_answer
from omniforge.eval.runner import generate_texts
from omniforge.model.generate import GenerationConfig
from omniforge.processing.chat import OmniProcessor
from omniforge.train.recipe import EvalSpec

BATCH = 16


class Evaluator:
    """Scores a model on each `EvalSpec`: exact match of greedy answers, or answer loss."""

    def __init__(self, specs: list[EvalSpec], processor: OmniProcessor):
        self.processor = processor
        self.sets = []
        for spec in specs:
            data = JsonlConversations(spec.path)
            prompts, answers, full = [], [], []
            for index in range(min(spec.limit, len(data))):
                record = data.record(index)
                messages = record["messages"]
                if not messages or messages[-1]["role"] != "assistant":
                    raise OmniforgeError(f"{data.where(index)}: an eval record must end with the assistant's answer")
                media = {m: record.get(m + "s", []) for m in ("image", "video", "audio")}
                media = {m: [str(data.path.parent / p) for p in v] for m, v in media.items()}
                prompt = processor.encode(messages[:-1], media, system=record.get("system"), add_generation_prompt=True,
                                          where=data.where(index))
                prompts.append(prompt)
                answers.append(messages[-1]["content"] or "")
                if spec.metric == "loss":
                    full.append(processor.encode(messages, media, system=record.get("system"), where=data.where(index)))
            self.sets.append((spec, prompts, answers, full))

    @torch.no_grad()
    def run(self, model, dist=None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        scores = {}
        for spec, prompts, answers, full in self.sets:
            scores[spec.name] = self._loss(model, full) if spec.metric == "loss" else self._exact(model, prompts, answers)
        model.train(was_training)
        return scores

    def _exact(self, model, prompts, answers) -> float:
        longest = max(len(self.processor.tokenizer(a).input_ids) for a in answers)
        config = GenerationConfig(max_new_tokens=longest + 4)
        right = 0
        for start in range(0, len(prompts), BATCH):
            texts = generate_texts(model, self.processor, prompts[start:start + BATCH], config)
            right += sum(normalize_answer(t) == normalize_answer(a) for t, a in zip(texts, answers[start:start + BATCH]))
        return right / len(prompts)

    def _loss(self, model, samples) -> float:
        total, count = 0.0, 0
        for start in range(0, len(samples), BATCH):
            inputs = self.processor.collate(samples[start:start + BATCH])
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            n = int((inputs["labels"][:, 1:] != -100).sum())
            total += model(**inputs).loss.item() * n
            count += n
        return total / max(count, 1)
