"""`omniforge demo` (= `make demo`): the embedded default, end to end, on a CPU.

synthesise the world -> pretrain the stand-in encoders (`recipes/micro_encoders.yaml`) ->
train every stage of `recipes/tiny.yaml` -> after each stage, score
every modality on the held-out test split -> a report folder (markdown, JSON, plots) with
PocketSphinx's WER on the same ASR audio beside ours -> two example answers.

    omniforge demo --out runs/demo            # 13.5-32 minutes on a 2-core CPU, by its speed (BENCHMARKS.md)
    omniforge demo --out runs/demo --quick    # the same path, small world and few steps (1.4-2.5 minutes)
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from omniforge.data.synthetic.world import WorldSize, synthesize_world
from omniforge.train.encoders import pretrain_encoders
from omniforge.train.recipe import load_recipe

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
QUICK_STEPS = 1 / 16
"""--quick trains this fraction of each stage's steps."""
EVAL_BATCH = 32
TEST_CACHE_BYTES = 2**30
"""The test split encoded (~0.2 GiB), kept from one stage's table to the next."""
BY_QUESTION = ("image_qa", "video_qa")
"""Tasks whose final scores the report also breaks down by kind of question."""
MAX_NEW_TOKENS = 32
"""Longest answer the world asks for (a transcript) is ~20 tokens."""
CTC_WEIGHT = 0.3
"""Joint CTC/attention decoding of transcripts (`GenerationConfig.ctc_weight`; ESPnet's usual 0.3):
world seed 1, validation ASR 5.7 -> 0.7 % WER, and 14.1 -> 6.7 % on voices and rates neither split
uses (0.5: 5.8 %; BENCHMARKS.md, session 26)."""

COLUMNS = [  # (heading, task, metric, format)
    ("image QA", "image_qa", "exact_match", "pct"),
    ("OCR", "ocr", "exact_match", "pct"),
    ("hi-res OCR", "hires", "exact_match", "pct"),
    ("video QA", "video_qa", "exact_match", "pct"),
    ("ASR WER", "asr", "wer", "pct"),
    ("translation BLEU", "translation", "bleu", "num"),
    ("spoken QA", "spoken_qa", "exact_match", "pct"),
    ("heard word for word", "spoken_qa", "heard", "pct"),
    ("spoken/text agree", "consistency", "consistency", "pct"),
    ("background rejected", "background", "rejection", "pct"),
    ("queries ignored", "background", "false_rejection", "pct"),
    ("text QA", "text_qa", "exact_match", "pct"),
]


def run_demo(out: Path, quick: bool = False, seed: int = 0) -> dict:
    """Run everything; returns the report (also written to `out/report.json`)."""
    from omniforge.data.dataset import SampleCache
    from omniforge.eval.readers import TaskSpec, load_tasks
    from omniforge.eval.runner import evaluate
    from omniforge.model.generate import GenerationConfig
    from omniforge.train.loop import train

    started = time.perf_counter()
    out = Path(out)
    world = out / "world"
    print(f"== synthesising the world ({'quick' if quick else 'full'}, seed {seed}) -> {world}")
    synthesize_world(world, seed, WorldSize.quick() if quick else WorldSize())
    timings = {"synthesis": time.perf_counter() - started}
    tick = time.perf_counter()
    print("== pretraining the stand-in encoders (SigLIP-style tower, Whisper-style encoder) on the world; "
          "PocketSphinx transcribes the test audio beside them")
    encoders = pretrain_encoders(world, quick=quick,
                                 side_jobs={"pocketsphinx": (pocketsphinx_wer, (world / "test" / "asr.jsonl",))})
    peer = encoders.pop("pocketsphinx")
    timings["encoder_pretraining_and_pocketsphinx"] = time.perf_counter() - tick
    recipe = load_recipe(TINY_RECIPE, [f"data_dir={world.resolve()}", f"train.out_dir={out / 'train'}",
                                       f"train.seed={seed}"])
    recipe.evals = []  # the per-stage test table below is this run's forgetting monitor
    if quick:
        for stage in recipe.stages:
            stage.steps = max(8, round(stage.steps * QUICK_STEPS))
            stage.warmup_steps = min(stage.warmup_steps, stage.steps // 4)
    rows: list[dict] = []
    decoding = GenerationConfig(ctc_weight=CTC_WEIGHT)
    tasks = load_tasks(TaskSpec("synth", "synth", world / "test"))  # the whole split: 100 a task (±3 points)
    encoded_test = SampleCache(TEST_CACHE_BYTES)  # every stage's model has the same processor settings

    def after_stage(stage, model, export) -> None:
        tick = time.perf_counter()
        results = evaluate(model, tasks, out / "eval" / stage.name, batch_size=EVAL_BATCH,
                           max_new_tokens=MAX_NEW_TOKENS, progress=False, decoding=decoding, cache=encoded_test)
        scores = {r.task.split("/", 1)[1]: r.metrics for r in results}
        rows.append({"stage": stage.name, "scores": scores})
        print(f"\n== scores on the test split after {stage.name} ({time.perf_counter() - tick:.0f} s)")
        print(format_table(rows))

    tick = time.perf_counter()
    final = train(recipe, on_stage_end=after_stage)
    timings["training_and_evaluation"] = time.perf_counter() - tick
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    shutil.copytree(final, out / "checkpoint")

    last = out / "eval" / recipe.stages[-1].name / "predictions" / "synth"
    breakdown = {task: by_question(last / f"{task}.jsonl", world / "test" / f"{task}.jsonl") for task in BY_QUESTION}
    timings["total"] = time.perf_counter() - started
    report = {"quick": quick, "seed": seed, "encoders": encoders, "stages": rows, "by_question": breakdown,
              "pocketsphinx": peer, "examples": examples(out / "checkpoint", world / "test"), "timings_seconds": timings,
              "recipe": str(TINY_RECIPE), "checkpoint": str(out / "checkpoint")}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    write_report(out, report)
    print(f"\nASR on the same {peer['utterances']} test utterances: ours {pct(final_score(rows, 'asr', 'wer'))} WER, "
          f"PocketSphinx (its own English model) {pct(peer['wer'])} WER")
    for task, questions in breakdown.items():
        print(f"{task} by kind of question: " + ", ".join(f"{q} {pct(v['accuracy'])}" for q, v in questions.items()))
    for example in report["examples"]:
        heard = f"  [heard: {example['heard']}]" if example.get("heard") is not None else ""
        print(f"\n{example['what']}\n  Q: {example['question']}\n  A: {example['answer']}{heard}   "
              f"(reference: {example['reference']})")
    print(f"\nreport: {out / 'report.md'}  figures: {out / 'report.json'}  checkpoint: {out / 'checkpoint'}  "
          f"({timings['total'] / 60:.1f} min)")
    return report


def format_table(rows: list[dict]) -> str:
    """The per-stage, per-modality table (rows: stages; columns: `COLUMNS`)."""
    headings = ["after stage"] + [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    for row in rows:
        cells = [row["stage"]]
        for _, task, metric, kind in COLUMNS:
            value = row["scores"].get(task, {}).get(metric)
            cells.append("-" if value is None else pct(value) if kind == "pct" else f"{value:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_question(predictions: Path, source: Path) -> dict[str, dict]:
    """Accuracy of one task's predictions per kind of question: the question with its colour and
    shape words masked ("What colour is the <shape>?"), so that a weak skill shows by name; a
    question whose words and answer name a held-out (colour, shape) pair, one the training data
    never shows, is a kind of its own ("What colour is the <shape>? (held-out pair)")."""
    from omniforge.data.synthetic.scenes import COLOURS, HELD_OUT, SHAPES
    from omniforge.eval.readers import Sample, TaskSpec, load_tasks

    masks = {**{c: "<colour>" for c in COLOURS}, **{k: "<shape>" for k in SHAPES}}
    samples = {s.id: s for s in load_tasks(TaskSpec("source", "jsonl", source))[0].items if isinstance(s, Sample)}
    groups: dict[str, list[int]] = {}
    for line in predictions.read_text().splitlines():
        prediction = json.loads(line)
        if "skipped" in prediction:  # no answer to judge; the predictions file says why
            continue
        sample = samples[prediction["id"]]  # matched by the reader's id, as the predictions were made
        words = sample.messages[-1]["content"].split("\n")[-1].rstrip("?").split()
        template = " ".join(masks.get(word, word) for word in words) + "?"
        named = words + sample.reference.split()
        colours, kinds = [w for w in named if w in COLOURS], [w for w in named if w in SHAPES]
        if len(colours) == len(kinds) == 1 and (colours[0], kinds[0]) in HELD_OUT:
            template += " (held-out pair)"
        groups.setdefault(template, []).append(int(bool(prediction["correct"])))
    return {t: {"accuracy": 100 * sum(v) / len(v), "questions": len(v)} for t, v in sorted(groups.items())}


def pct(value: float | None) -> str:
    """Scores from omniforge.eval are already percentages."""
    return "-" if value is None else f"{value:.1f}%"


def final_score(rows: list[dict], task: str, metric: str) -> float | None:
    return rows[-1]["scores"].get(task, {}).get(metric) if rows else None


def pocketsphinx_wer(asr_file: Path) -> dict:
    """PocketSphinx's corpus WER on the ASR test utterances (the ones we are scored on)."""
    from omniforge.eval.metrics import wer
    from omniforge.eval.pocketsphinx_peer import available, transcribe
    from omniforge.eval.readers import Sample, TaskSpec, load_tasks
    from omniforge.processing.audio import load_audio

    if not available():
        return {"wer": None, "utterances": 0, "note": "pocketsphinx is not installed"}
    started = time.perf_counter()
    [task] = load_tasks(TaskSpec("asr", "jsonl", asr_file))  # read as our model's evaluation reads it
    samples = [s for s in task.items if isinstance(s, Sample)]
    hypotheses = [transcribe(load_audio(s.media["audio"][0])) for s in samples]
    references = [s.reference for s in samples]
    return {"wer": wer(hypotheses, references), "utterances": len(samples), "seconds": time.perf_counter() - started,
            "samples": [{"reference": r, "pocketsphinx": h} for r, h in list(zip(references, hypotheses))[:5]]}


def examples(checkpoint: Path, test: Path) -> list[dict]:
    """Two answers of the final model: a question about an image, and one asked aloud."""
    from omniforge.eval.runner import generate_completions
    from omniforge.model.generate import GenerationConfig
    from omniforge.model.omni import OmniModel
    from omniforge.processing.chat import OmniProcessor, record_media

    model = OmniModel.from_pretrained(checkpoint).eval()
    processor = OmniProcessor.from_model(model)
    picked = [("an image question, as text", "image_qa.jsonl", 0), ("a question asked aloud about an image",
                                                                  "spoken_qa.jsonl", 0)]
    out = []
    for what, file, index in picked:
        record = json.loads((test / file).read_text().splitlines()[index])
        media = record_media(record, test)
        prompt = processor.encode(record["messages"][:-1], media, add_generation_prompt=True)
        config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, ctc_weight=CTC_WEIGHT)
        [answer] = generate_completions(model, processor, [prompt], config)
        question = record["messages"][0]["content"].replace("\n", " ")
        if media["audio"]:
            question += f"  [spoken: {Path(media['audio'][0]).name}]"
        out.append({"what": what, "question": question, "answer": answer.text, "heard": answer.heard,
                    "reference": record["messages"][-1]["content"], "media": media})
    return out


def write_report(out: Path, report: dict) -> None:
    """`out/report.md` with the table, the plots (loss, scores by stage), the peer and the examples."""
    plot_scores(report["stages"], out / "scores_by_stage.png")
    shutil.copy(out / "train" / "loss.png", out / "loss.png")
    peer = report["pocketsphinx"]
    lines = [
        "# omniforge demo report", "",
        f"{'Quick' if report['quick'] else 'Full'} run, seed {report['seed']}, recipe `{report['recipe']}`; "
        f"{report['timings_seconds']['total'] / 60:.1f} minutes in all.", "",
        "## The stand-in encoders (pretrained on the world's training side before the recipe)", "",
        f"- vision tower, accuracy % on freshly rendered images: {report['encoders']['vision']}",
        f"- audio encoder, greedy CTC on the validation ASR utterances: "
        f"{pct(report['encoders']['audio']['ctc_wer'])} WER", "",
        "## Per-modality scores on the held-out test split, after every stage", "",
        format_table(report["stages"]), "",
        "Test data uses voices, speaking rates and (colour, shape) pairs never seen in training.", "",
        "![scores by stage](scores_by_stage.png)", "", "![training loss](loss.png)", "",
        "## The final model by kind of question", "",
        "| task | question | accuracy | questions |", "|---|---|---|---|",
        *(f"| {task} | {q} | {pct(v['accuracy'])} | {v['questions']} |"
          for task, questions in report["by_question"].items() for q, v in questions.items()), "",
        "## A real peer on the same audio", "",
        f"PocketSphinx (general-purpose English model shipped in its wheel) on the same "
        f"{peer['utterances']} test utterances: WER {pct(peer['wer'])}; ours after the last stage: "
        f"{pct(final_score(report['stages'], 'asr', 'wer'))}."
        + (f" It decoded them in {peer['seconds']:.0f} s, in a process of its own beside the encoders' pretraining."
           if "seconds" in peer else ""),
        "", "## Example answers", "",
    ]
    for example in report["examples"]:
        heard = f" (heard: \"{example['heard']}\")" if example.get("heard") is not None else ""
        lines += [f"- {example['what']}: *{example['question']}* -> **{example['answer']}**{heard} "
                  f"(reference: {example['reference']})"]
    lines += ["", "## Time", ""] + [f"- {k}: {v:.0f} s" for k, v in report["timings_seconds"].items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def plot_scores(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 4.5))
    stages = [r["stage"] for r in rows]
    for heading, task, metric, kind in COLUMNS:
        if kind != "pct":
            continue
        values = [r["scores"].get(task, {}).get(metric) for r in rows]
        if any(v is not None for v in values):
            axis.plot(stages, [float("nan") if v is None else v for v in values], marker="o", label=heading)
    axis.set_ylabel("% (WER and 'queries ignored': lower is better)")
    axis.set_ylim(-2, 102)
    axis.legend(fontsize=7, ncol=3)
    axis.tick_params(axis="x", labelsize=7, rotation=15)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
