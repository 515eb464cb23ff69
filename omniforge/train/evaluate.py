"""Held-out sets watched while training: every modality's score, as it changes (forgetting monitor)."""

from __future__ import annotations

import torch

from omniforge.data.dataset import JsonlConversations
from omniforge.errors import DataError, OmniforgeError
from omniforge.eval.metrics import bleu_chrf, exact_match, wer
from omniforge.eval.runner import generate_completions
from omniforge.model.generate import GenerationConfig
from omniforge.processing.chat import ConversationError, OmniProcessor, record_media
from omniforge.train.recipe import EvalSpec

BATCH = 16


class Evaluator:
    """Scores a model on each `EvalSpec`: its greedy answers (exact match, WER or BLEU), or answer loss."""

    def __init__(self, specs: list[EvalSpec], processor: OmniProcessor, warn=print):
        self.processor = processor
        self.sets = []
        for spec in specs:
            data = JsonlConversations(spec.path)
            prompts, answers, full, skipped = [], [], [], []
            said = []  # each reference turn's text as generated: what was heard (spoken queries) and the answer
            for index in range(len(data)):
                if len(prompts) == spec.limit:
                    break
                try:
                    messages, media, system = _answered_record(data, index)
                    prompt = processor.encode(messages[:-1], media, system=system, add_generation_prompt=True,
                                              where=data.where(index))
                    if spec.metric == "loss":
                        full.append(processor.encode(messages, media, system=system, where=data.where(index)))
                except OmniforgeError as e:
                    skipped.append(str(e))
                    continue
                prompts.append(prompt)
                answers.append(messages[-1]["content"] or "")
                said.append(f"{messages[-1].get('heard') or ''} {answers[-1]}")
            if skipped:
                warn(f"eval {spec.name}: {len(skipped)} record(s) of {spec.path} skipped, e.g. {skipped[0]}")
            if not prompts:
                raise DataError(f"eval {spec.name}: no usable record in {spec.path}")
            budget = 4 + max(len(processor.tokenizer(s).input_ids) for s in said)  # + state and heard tokens
            self.sets.append((spec, prompts, answers, full, budget))

    @torch.no_grad()
    def run(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        scores = {}
        for spec, prompts, answers, full, budget in self.sets:
            scores[spec.name] = (self._loss(model, full) if spec.metric == "loss"
                                 else self._generated(model, prompts, answers, spec.metric, budget))
        model.train(was_training)
        return scores

    def _generated(self, model, prompts, answers, metric: str, budget: int) -> float:
        config = GenerationConfig(max_new_tokens=budget)
        texts = []
        for start in range(0, len(prompts), BATCH):
            texts += [c.text for c in generate_completions(model, self.processor, prompts[start:start + BATCH], config)]
        if metric == "wer":
            return wer(texts, answers)
        if metric == "bleu":
            return bleu_chrf(texts, answers)["bleu"]
        return exact_match(texts, answers)

    def _loss(self, model, samples) -> float:
        total, count = 0.0, 0
        for start in range(0, len(samples), BATCH):
            inputs = self.processor.collate(samples[start:start + BATCH])
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            n = int((inputs["labels"][:, 1:] != -100).sum())
            total += model(**inputs).loss.item() * n
            count += n
        return total / max(count, 1)


def _answered_record(data: JsonlConversations, index: int) -> tuple[list[dict], dict[str, list[str]], str | None]:
    """(messages, media paths, system) of a record whose last turn is the reference answer."""
    record = data.record(index)
    messages = record.get("messages") if isinstance(record, dict) else None
    if not (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
            and messages[-1].get("role") == "assistant"):
        raise ConversationError(f"{data.where(index)}: an eval record must end with the assistant's answer")
    return messages, record_media(record, data.path.parent, data.where(index)), record.get("system")
