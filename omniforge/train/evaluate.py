"""Held-out sets watched while training: every modality's score, as it changes (forgetting monitor)."""

from __future__ import annotations

from pathlib import Path

import torch

from omniforge.errors import DataError, OmniforgeError
from omniforge.eval.metrics import normalize_answer
from omniforge.eval.readers import Skipped, read_jsonl
from omniforge.eval.runner import generate_texts
from omniforge.model.generate import GenerationConfig
from omniforge.processing.chat import OmniProcessor
from omniforge.train.recipe import EvalSpec

BATCH = 16


class Evaluator:
    """Scores a model on each `EvalSpec`: exact match of greedy answers, or answer loss."""

    def __init__(self, specs: list[EvalSpec], processor: OmniProcessor, warn=print):
        self.processor = processor
        self.sets = []
        for spec in specs:
            prompts, answers, full, skipped = [], [], [], []
            for sample in read_jsonl(Path(spec.path)):
                if len(prompts) == spec.limit:
                    break
                if isinstance(sample, Skipped):
                    skipped.append(sample)
                    continue
                try:
                    prompt = processor.encode(sample.messages, sample.media, system=sample.system,
                                              add_generation_prompt=True, where=sample.id)
                    if spec.metric == "loss":
                        answered = sample.messages + [{"role": "assistant", "content": sample.reference}]
                        full.append(processor.encode(answered, sample.media, system=sample.system, where=sample.id))
                except OmniforgeError as e:
                    skipped.append(Skipped(sample.id, str(e)))
                    continue
                prompts.append(prompt)
                answers.append(sample.reference)
            if skipped:
                warn(f"eval {spec.name}: {len(skipped)} record(s) of {spec.path} skipped, e.g. "
                     f"{skipped[0].id}: {skipped[0].reason}")
            if not prompts:
                raise DataError(f"eval {spec.name}: no usable record in {spec.path}")
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
