"""Run tasks through a model: batched greedy answers, per-sample verdicts, scores, reports.

    results = evaluate(model, tasks, out_dir, batch_size=8)

writes `out_dir/predictions/<task>.jsonl` (one line per sample: the answer, the reference,
what was parsed from the answer and whether it is right; or the reason it was skipped),
`out_dir/scores.json` (one entry per task: task, metrics, samples, skipped) and
`out_dir/scores.md` (the same as a markdown table). Spoken and written versions of one
question (JSONL records sharing a `pair_id`) add a `<label>/consistency` entry.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from omniforge.data.dataset import SampleCache
from omniforge.errors import OmniforgeError
from omniforge.eval import metrics
from omniforge.eval.readers import Sample, Skipped, Task
from omniforge.model.generate import Completion, GenerationConfig, generate
from omniforge.processing.chat import Encoded, OmniProcessor

MAX_NEW_TOKENS = {"mme": 16, "yes_no": 16, "mcq": 16, "video_mcq": 16, "exact_match": 64, "background": 64,
                  "wer": 256, "cer": 256, "bleu": 256}
"""Answer budget by metric: a letter or yes/no needs few tokens, a transcript or translation many."""
SHOWN_SKIPS = 5
"""Skipped samples reported as they happen, per task (all are in the predictions file)."""


@dataclass
class Prediction:
    """A sample, the model's answer, and the per-sample verdict scoring uses."""

    sample: Sample
    text: str
    verdict: dict[str, Any]
    """`parsed` (choice letter or yes/no label) and `correct`, or `ignored` (background); empty for corpus metrics."""
    heard: str | None = None
    """What the model said it heard of a spoken question, before its answer (None: nothing)."""


@dataclass
class TaskScores:
    """One entry of scores.json."""

    task: str
    metrics: dict[str, float]
    samples: int
    """Samples answered and scored (MMBench: one per rotation)."""
    skipped: int


def evaluate(model, tasks: list[Task], out_dir: str | Path, batch_size: int = 8, max_new_tokens: int | None = None,
             progress: bool = True, decoding: GenerationConfig | None = None,
             cache: SampleCache | None = None) -> list[TaskScores]:
    """Answer and score every task; write predictions, scores.json and scores.md under `out_dir`.
    decoding: how to pick tokens (visual contrast, CTC fusion; default plain greedy), see `predict`.
    cache: encoded prompts kept for the next call that scores the same tasks with a model of the
    same processor settings (the demo scores its test split after every stage; encoding is a fifth
    of a table's time), keyed by task name and item."""
    require_distinct_names(tasks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor = OmniProcessor.from_model(model)
    was_training = model.training
    model.eval()
    results, by_group = [], defaultdict(list)
    try:
        for task in tasks:
            outcomes = predict(model, processor, task.items, batch_size, max_new_tokens, progress, desc=task.name,
                               decoding=decoding, cache=cache)
            write_predictions(out_dir / "predictions" / f"{task.name}.jsonl", outcomes)
            answered = [o for o in outcomes if isinstance(o, Prediction)]
            results.append(TaskScores(task.name, score(answered) if answered else {}, len(answered),
                                      len(outcomes) - len(answered)))
            by_group[task.group] += answered
    finally:
        model.train(was_training)
    results += [entry for group, answered in by_group.items() if (entry := consistency_scores(group, answered))]
    (out_dir / "scores.json").write_text(json.dumps([asdict(r) for r in results], indent=2, ensure_ascii=False) + "\n")
    (out_dir / "scores.md").write_text(scores_markdown(results))
    return results


def require_distinct_names(tasks: list[Task]) -> None:
    """Each task writes predictions/<name>.jsonl: two tasks of one name would overwrite each other."""
    names = [task.name for task in tasks]
    if len(set(names)) < len(names):
        raise OmniforgeError(f"task names must differ (their predictions files would collide): {names}; "
                             "label repeated kinds, LABEL:KIND=PATH")


def predict(model, processor: OmniProcessor, items: list[Sample | Skipped], batch_size: int = 8,
            max_new_tokens: int | None = None, progress: bool = True, desc: str | None = None,
            decoding: GenerationConfig | None = None, cache: SampleCache | None = None) -> list[Prediction | Skipped]:
    """Answers in batches, in item order; a sample whose media or messages fail to encode is skipped.

    decoding: a `GenerationConfig` whose `max_new_tokens` and `transcribe` each batch sets itself (the
    metric's budget; a transcript where the metric is WER); None: greedy. cache: encoded prompts,
    keyed by (`desc`, item index), as `evaluate` says."""
    outcomes: list[Prediction | Skipped] = []
    shown = 0
    with tqdm(total=len(items), desc=desc, unit="sample", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            keys = [(desc or "", i) for i in range(start, min(start + batch_size, len(items)))]
            answered = _answer_batch(model, processor, items[start:start + batch_size], max_new_tokens,
                                     decoding or GenerationConfig(), cache, keys)
            for skip in (o for o in answered if isinstance(o, Skipped)):
                if shown < SHOWN_SKIPS:
                    shown += 1
                    tqdm.write(f"skipped {skip.id}: {skip.reason}", file=sys.stderr)
            outcomes += answered
            bar.update(len(answered))
    return outcomes


def _answer_batch(model, processor: OmniProcessor, chunk: list[Sample | Skipped], max_new_tokens: int | None,
                  decoding: GenerationConfig, cache: SampleCache | None,
                  keys: list[tuple[str, int]]) -> list[Prediction | Skipped]:
    """One batch, in order: each sample encoded (or skipped), the encoded ones answered together and judged."""
    samples = [(i, item) for i, item in enumerate(chunk) if isinstance(item, Sample)]
    slots: list[Prediction | Skipped] = list(chunk)
    if samples:
        budget = max_new_tokens or max(MAX_NEW_TOKENS[sample.metric] for _, sample in samples)
        config = replace(decoding, max_new_tokens=budget, transcribe=all(s.metric == "wer" for _, s in samples))
        answers = answer_prompts(model, processor, [Prompt(s.messages, s.media, s.system, s.id) for _, s in samples],
                                 config, cache, [keys[i] for i, _ in samples])
        for (i, sample), answer in zip(samples, answers):
            slots[i] = (Skipped(sample.id, str(answer)) if isinstance(answer, OmniforgeError)
                        else Prediction(sample, answer.text, judge(sample, answer.text), answer.heard))
    return slots


class Prompt(NamedTuple):
    """A question to answer."""

    messages: list[dict]
    media: dict[str, list]
    system: str | None
    """None: the model's default system prompt."""
    where: str
    """What errors name it by."""


def answer_prompts(model, processor: OmniProcessor, prompts: list[Prompt], config: GenerationConfig,
                   cache: SampleCache | None = None, keys: list | None = None) -> list[Completion | OmniforgeError]:
    """Answers to one batch of prompts, in order; a prompt whose media or messages fail to encode
    gets its error instead, and the rest are answered. cache, keys: each prompt's encoding is looked
    up in (and put into) `cache` under its key (one a prompt)."""
    if cache is not None and (keys is None or len(keys) != len(prompts)):
        raise ValueError(f"answer_prompts: a cache needs one key a prompt ({len(prompts)} prompts, keys {keys})")
    encoded: list[Encoded | OmniforgeError] = []
    for prompt, key in zip(prompts, keys or [None] * len(prompts)):
        if cache is not None and (held := cache.get(key)) is not None:
            encoded.append(held)
            continue
        try:
            encoded.append(processor.encode(prompt.messages, prompt.media, system=prompt.system,
                                            add_generation_prompt=True, where=prompt.where))
        except OmniforgeError as e:
            encoded.append(e)
            continue
        if cache is not None:
            cache.put(key, encoded[-1])
    ready = [e for e in encoded if not isinstance(e, OmniforgeError)]
    answers = iter(generate_completions(model, processor, ready, config) if ready else [])
    return [e if isinstance(e, OmniforgeError) else next(answers) for e in encoded]


def generate_completions(model, processor: OmniProcessor, encoded: list[Encoded],
                         config: GenerationConfig) -> list[Completion]:
    """The answers to encoded prompts, batched with left padding."""
    inputs = processor.collate(encoded, padding_side="left")
    inputs.pop("labels")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    return generate(model, config=config, **inputs)


def judge(sample: Sample, text: str) -> dict[str, Any]:
    """The per-sample verdict: what the answer says and whether it is right (corpus metrics: nothing)."""
    if sample.metric in ("mme", "yes_no"):
        label = metrics.yes_no_label(text)
        return {"parsed": label, "correct": label == sample.reference.strip().lower()}
    if sample.metric in ("mcq", "video_mcq"):
        choice = metrics.extract_choice(text, sample.extra["options"])
        return {"parsed": choice, "correct": choice == sample.reference}
    if sample.metric == "exact_match":
        return {"correct": metrics.same_answer(text, sample.reference)}
    if sample.metric == "background":
        return {"ignored": metrics.is_blank(text)}
    return {}


def score(predictions: list[Prediction]) -> dict[str, float]:
    """The task's metrics; a task mixing metrics (a JSONL file may) gets `<metric>/<name>` keys. Where
    references say what a spoken question says (`heard`), `heard` is the % of answers that repeated it
    word for word before answering."""
    by_metric = defaultdict(list)
    for p in predictions:
        by_metric[p.sample.metric].append(p)
    scores = {}
    for metric, group in by_metric.items():
        values = _aggregate(metric, group)
        scores.update({f"{metric}/{k}": v for k, v in values.items()} if len(by_metric) > 1 else values)
    transcribed = [p for p in predictions if "heard" in p.sample.extra]
    if transcribed:  # apart from the answers: how often the question itself was heard word for word
        scores["heard"] = metrics.accuracy([metrics.same_words(p.heard or "", p.sample.extra["heard"]) for p in transcribed])
    return scores


def _aggregate(metric: str, predictions: list[Prediction]) -> dict[str, float]:
    correct = [p.verdict.get("correct", False) for p in predictions]
    texts, references = [p.text for p in predictions], [p.sample.reference for p in predictions]

    def extra(key: str) -> list:
        return [p.sample.extra.get(key, "") for p in predictions]

    if metric == "mme":
        return metrics.mme_scores(extra("category"), extra("image"), correct)
    if metric == "yes_no":
        return metrics.yes_no_scores(extra("image"), correct)
    if metric == "mcq" and all("rotation" in p.sample.extra for p in predictions):
        return metrics.mmbench_scores(extra("question_id"), extra("rotation"), extra("category"), correct)
    if metric == "mcq":
        return {"accuracy": metrics.accuracy(correct)}
    if metric == "video_mcq":
        return metrics.duration_scores(extra("duration"), correct)
    if metric == "exact_match":
        return {"exact_match": metrics.accuracy(correct)}
    if metric == "background":
        return metrics.background_rejection([p.verdict["ignored"] for p in predictions], extra("addressed"))
    if metric == "wer":
        return {"wer": metrics.wer(texts, references)}
    if metric == "cer":
        return {"cer": metrics.cer(texts, references)}
    if metric == "bleu":
        languages = extra("language")
        if len(set(languages)) == 1:
            return metrics.bleu_chrf(texts, references, language=languages[0])
        scores = {}  # a file of several target languages: each corpus scored with its own tokenizer
        for language in sorted(set(languages)):
            keep = [i for i, code in enumerate(languages) if code == language]
            values = metrics.bleu_chrf([texts[i] for i in keep], [references[i] for i in keep], language=language)
            scores.update({f"{name}/{language or 'unspecified'}": value for name, value in values.items()})
        return scores
    raise ValueError(f"unknown metric {metric!r}")


def consistency_scores(group: str, predictions: list[Prediction]) -> TaskScores | None:
    """Cross-modal consistency over the `pair_id` pairs of a group: one written, one spoken (has audio)."""
    pairs = defaultdict(list)
    for p in predictions:
        if "pair_id" in p.sample.extra:
            pairs[p.sample.extra["pair_id"]].append(p)
    written, spoken = [], []
    for members in pairs.values():
        speech = [p.text for p in members if p.sample.media.get("audio")]
        text = [p.text for p in members if not p.sample.media.get("audio")]
        if len(speech) == 1 and len(text) == 1:
            written += text
            spoken += speech
    if not written:
        return None
    return TaskScores(f"{group}/consistency", {"consistency": metrics.consistency(written, spoken)}, len(written), 0)


# --------------------------------------------------------------------------- files and reports


def write_predictions(path: Path, outcomes: list[Prediction | Skipped]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for o in outcomes:
            if isinstance(o, Skipped):
                record = {"id": o.id, "skipped": o.reason}
            else:
                record = {"id": o.sample.id, "prediction": o.text, "reference": o.sample.reference,
                          "metric": o.sample.metric, **o.verdict, **o.sample.extra}
                if o.heard is not None:
                    record["heard"] = o.heard
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


def load_scores(path: str | Path) -> list[dict[str, Any]]:
    """A scores.json written by `evaluate` (to compare against)."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise OmniforgeError(f"{path}: no such scores file") from None
    except json.JSONDecodeError as e:
        raise OmniforgeError(f"{path}: invalid JSON ({e.msg})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("metrics"), dict)
                                                and "task" in e for e in entries):
        raise OmniforgeError(f"{path}: expected a list of {{task, metrics, samples, skipped}} entries (a scores.json)")
    return entries


def scores_markdown(results: list[TaskScores]) -> str:
    """One row per metric; task, samples and skipped on each task's first row."""
    lines = ["| task | metric | value | samples | skipped |", "|---|---|---:|---:|---:|"]
    for r in results:
        rows = list(r.metrics.items()) or [("-", None)]
        for i, (name, value) in enumerate(rows):
            head = (r.task, r.samples, r.skipped) if i == 0 else ("", "", "")
            lines.append(f"| {head[0]} | {_metric_name(name)} | {_number(value)} | {head[1]} | {head[2]} |")
    return "\n".join(lines) + "\n"


def compare_markdown(results: list[TaskScores], other: list[dict[str, Any]]) -> str:
    """This run's metrics beside another scores.json's, with the difference (this - other)."""
    before = {(e["task"], name): value for e in other for name, value in e["metrics"].items()}
    lines = ["| task | metric | this | other | delta |", "|---|---|---:|---:|---:|"]
    for r in results:
        for name, value in r.metrics.items():
            old = before.get((r.task, name))
            delta = "-" if old is None else f"{value - old:+.2f}"
            lines.append(f"| {r.task} | {_metric_name(name)} | {_number(value)} | {_number(old)} | {delta} |")
    return "\n".join(lines) + "\n"


def _metric_name(name: str) -> str:
    return f"{name} (lower is better)" if name.rsplit("/", 1)[-1] in metrics.LOWER_IS_BETTER else name


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
