"""Benchmark readers: each turns a benchmark, laid out as it is distributed, into `Sample`s.

    --task librispeech=/data/LibriSpeech/test-clean    SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt + .flac
    --task aishell=/data/data_aishell                  transcript/aishell_transcript_v0.8.txt + wav/test/SPKR/ID.wav
    --task mme=/data/MME_Benchmark_release_version     CATEGORY/{images/, questions_answers_YN/} or image + .txt pairs
    --task mmbench=/data/MMBench_DEV_EN.tsv            index, question, hint, A..D, answer, category, image (base64)
    --task videomme=/data/Video-MME                    an annotation .json/.jsonl + videos/ (or data/) <videoID>.mp4
    --task covost=/data/covost_v2.en_de.test.tsv       path, sentence, translation columns + clips/ beside it
    --task jsonl=/data/mine.jsonl                      the training format; the last assistant turn is the reference
    --task synth=/data/synth/test                      every *.jsonl of a folder, each its own task

A `--task` may carry a label, `LABEL:KIND=PATH`, which names its scores (default: the kind).
A folder or file that is missing or not in the benchmark's layout raises `BenchmarkError`
naming it; one malformed entry becomes a `Skipped` (counted in the scores, listed with its
reason in the predictions), never the end of a long evaluation. Media are referenced, not
decoded, here: a corrupt file is found, and skipped, when the runner encodes it.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import re
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

from omniforge.errors import OmniforgeError
from omniforge.eval.metrics import extract_choice, yes_no_label
from omniforge.processing.media import IMAGE_EXTS

MODALITIES = ("image", "video", "audio")
ASR_PROMPT = "<audio>\nTranscribe the speech."
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
"""The MMBench prompt of LLaVA and lmms-eval."""
VIDEOMME_PROMPT = ("<video>\nSelect the best answer to the following multiple-choice question based on the video. "
                   "Respond with only the letter (A, B, C, or D) of the correct option.\n{question}\n{options}\n"
                   "The best answer is:")
"""Video-MME's own prompt (without subtitles)."""
LANGUAGES = {"ar": "Arabic", "ca": "Catalan", "cy": "Welsh", "de": "German", "en": "English", "es": "Spanish",
             "et": "Estonian", "fa": "Persian", "fr": "French", "id": "Indonesian", "ja": "Japanese", "lv": "Latvian",
             "mn": "Mongolian", "sl": "Slovenian", "sv": "Swedish", "ta": "Tamil", "tr": "Turkish", "zh": "Chinese"}
"""CoVoST 2's target languages."""
JSONL_METRICS = ("exact_match", "wer", "cer", "bleu", "mcq", "yes_no", "background")
TASK_METRICS = {"asr": "wer", "translation": "bleu", "background": "background"}
"""A JSONL record's default metric by its `task` (the synthetic world's); exact_match otherwise."""
FOLDER_KINDS = {"librispeech", "aishell", "mme", "videomme"}
MMBENCH_COPY = 1_000_000
"""MMBench TSVs may carry their own circular copies at index + k * 1e6; rotations are generated here instead."""


class BenchmarkError(OmniforgeError, ValueError):
    """A benchmark folder or file is missing or not in its distributed layout; the message names it."""


@dataclass
class Sample:
    """One prompt to answer: the conversation up to the answer, its media, and the reference."""

    id: str
    messages: list[dict[str, Any]]
    """User (and earlier) turns in the training format: one placeholder per media item."""
    reference: str
    metric: str
    """How the answer is scored: mme, yes_no, mcq, video_mcq, exact_match, wer, cer, bleu, background."""
    media: dict[str, list] = field(default_factory=dict)
    """modality -> sources (paths, bytes, PIL images, 16-kHz waveforms) in placeholder order."""
    system: str | None = None
    """System prompt; None: the model's default for the data type."""
    extra: dict[str, Any] = field(default_factory=dict)
    """What scoring groups by: category, image, options, question_id, rotation, duration, language, pair_id;
    `heard`: the transcript an answer to a spoken question should repeat first."""


@dataclass
class Skipped:
    """An entry that could not be read, or whose media failed to load, and why."""

    id: str
    reason: str


@dataclass
class Task:
    """Items scored together under one name (`mme`, or `synth/asr` for one file of a folder)."""

    name: str
    items: list[Sample | Skipped]
    group: str
    """The `--task` label it came from: spoken/written question pairs are matched within a group."""


@dataclass
class TaskSpec:
    """One `--task [LABEL:]KIND=PATH` argument."""

    label: str
    kind: str
    path: Path

    def __post_init__(self):
        self.path = Path(self.path)  # a str from Python callers works too


def parse_task_spec(text: str) -> TaskSpec:
    """`KIND=PATH` or `LABEL:KIND=PATH`; the kind must be a known reader."""
    head, sep, path = text.partition("=")
    label, _, kind = head.rpartition(":")
    if not sep or not path or not kind:
        raise BenchmarkError(f"--task {text!r}: expected KIND=PATH or LABEL:KIND=PATH")
    if kind not in KINDS:
        raise BenchmarkError(f"--task {text!r}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    return TaskSpec(label or kind, kind, Path(path).expanduser())


def load_tasks(spec: TaskSpec, limit: int | None = None) -> list[Task]:
    """The tasks of one `--task`: one, or one per JSONL file of a folder. `limit`: first N entries of each.

    MMBench questions are expanded to every rotation of their options after the limit, so
    `limit` counts questions.
    """
    if not spec.path.exists():
        raise BenchmarkError(f"{spec.label}: {spec.path} does not exist")
    if spec.kind in FOLDER_KINDS and not spec.path.is_dir():
        raise BenchmarkError(f"{spec.label}: {spec.path} is not a folder (a {spec.kind} task reads the benchmark's folder)")
    if spec.kind in ("jsonl", "synth") and spec.path.is_dir():
        files = sorted(spec.path.glob("*.jsonl"))
        if not files:
            raise BenchmarkError(f"{spec.label}: no *.jsonl files in {spec.path}")
        return [Task(f"{spec.label}/{f.stem}", list(islice(read_jsonl(f), limit)), spec.label) for f in files]
    items = list(islice(KINDS[spec.kind](spec.path), limit))
    if spec.kind == "mmbench":
        items = [v for item in items for v in (circular_variants(item) if isinstance(item, Sample) else [item])]
    return [Task(spec.label, items, spec.label)]


# --------------------------------------------------------------------------- speech


def read_librispeech(root: Path) -> Iterator[Sample | Skipped]:
    """A LibriSpeech split folder (e.g. test-clean): one sample per transcript line, scored by WER."""
    transcripts = sorted(root.glob("*/*/*.trans.txt"))
    if not transcripts:
        raise BenchmarkError(f"{root}: no SPEAKER/CHAPTER/*.trans.txt files; expected a LibriSpeech split folder "
                             "such as LibriSpeech/test-clean")
    for file in transcripts:
        for n, line in _lines(file):
            utterance, _, text = line.partition(" ")
            if not text.strip():
                yield Skipped(f"{file.name}:{n}", "expected 'UTTERANCE-ID TRANSCRIPT'")
                continue
            yield Sample(utterance, _user(ASR_PROMPT), text.strip(), "wer",
                         media={"audio": [str(file.parent / f"{utterance}.flac")]})


def read_aishell(root: Path) -> Iterator[Sample | Skipped]:
    """AISHELL-1's test split (corpus root holding transcript/ and wav/), scored by CER.

    A wav with no transcript line is skipped (counted), as Kaldi's data preparation drops it.
    """
    transcript = root / "transcript" / "aishell_transcript_v0.8.txt"
    if not transcript.is_file():
        raise BenchmarkError(f"{root}: no transcript/aishell_transcript_v0.8.txt; expected the AISHELL-1 root "
                             "(data_aishell)")
    wavs = sorted((root / "wav" / "test").glob("*/*.wav"))
    if not wavs:
        packed = list((root / "wav").glob("*.tar.gz"))
        hint = f"; extract the {len(packed)} .tar.gz files in {root / 'wav'} first" if packed else ""
        raise BenchmarkError(f"{root}: no wav/test/SPEAKER/*.wav files{hint}")
    texts = {}
    for _, line in _lines(transcript):
        utterance, _, text = line.partition(" ")
        texts[utterance] = "".join(text.split())
    for wav in wavs:
        if not texts.get(wav.stem):
            yield Skipped(wav.stem, f"{wav}: no line in {transcript.name}")
            continue
        yield Sample(wav.stem, _user(ASR_PROMPT), texts[wav.stem], "cer", media={"audio": [str(wav)]})


def read_covost(path: Path) -> Iterator[Sample | Skipped]:
    """A CoVoST-2 TSV (`covost_v2.en_de.test.tsv`: path, sentence, translation) with `clips/` beside it.

    The target language, from the file name, words the prompt and picks the BLEU tokenizer.
    """
    tsv = _single_file(path, "*.tsv", "a CoVoST-2 .tsv")
    match = re.search(r"\.([a-z]{2,3}(?:-[A-Za-z]+)?)_([a-z]{2,3}(?:-[A-Za-z]+)?)\.", tsv.name)
    if match is None:
        raise BenchmarkError(f"{tsv}: expected a CoVoST-2 file name such as covost_v2.en_de.test.tsv "
                             "(source_target languages)")
    target = match.group(2)
    prompt = f"<audio>\nTranslate the speech into {LANGUAGES.get(target.split('-')[0], target)}."
    with tsv.open(newline="", encoding="utf-8") as f:  # written by pandas with quoting off and \ escapes
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        _require_columns(tsv, rows.fieldnames, ("path", "translation"))
        for n, row in enumerate(rows, 1):
            clip, translation = (row.get("path") or "").strip(), (row.get("translation") or "").strip()
            if not clip or not translation:
                yield Skipped(f"{tsv.name}:{n}", "empty path or translation")
                continue
            yield Sample(clip, _user(prompt), translation, "bleu", media={"audio": [str(tsv.parent / "clips" / clip)]},
                         extra={"language": target, "source_text": row.get("sentence", "")})


# --------------------------------------------------------------------------- images and video


def read_mme(root: Path) -> Iterator[Sample | Skipped]:
    """MME: one folder per category; two yes/no questions per image (`question<TAB>answer` lines).

    A category holds either `images/` + `questions_answers_YN/*.txt`, or images with a
    same-named .txt beside each. Folders in neither layout (e.g. an eval_tool/) are ignored.
    """
    found = False
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        split = (folder / "questions_answers_YN").is_dir()
        text_dir, image_dir = (folder / "questions_answers_YN", folder / "images") if split else (folder, folder)
        questions = sorted(text_dir.glob("*.txt"))
        if not questions:
            continue
        found = True
        images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS} if image_dir.is_dir() else {}
        for file in questions:
            for i, (n, line) in enumerate(_lines(file)):
                sample_id = f"{folder.name}/{file.stem}/{i}"
                question, _, answer = line.partition("\t")
                if answer.strip().lower() not in ("yes", "no"):
                    yield Skipped(sample_id, f"{file}: line {n}: expected 'question<TAB>Yes|No'")
                elif file.stem not in images:
                    yield Skipped(sample_id, f"{file}: no image named {file.stem}.* in {image_dir}")
                else:
                    yield Sample(sample_id, _user(f"<image>\n{question.strip()}"), answer.strip(), "mme",
                                 media={"image": [str(images[file.stem])]},
                                 extra={"category": folder.name, "image": file.stem})
    if not found:
        raise BenchmarkError(f"{root}: no MME category folders (CATEGORY/questions_answers_YN/*.txt or "
                             "CATEGORY/*.txt beside the images)")


def read_mmbench(path: Path) -> Iterator[Sample | Skipped]:
    """An MMBench TSV as VLMEvalKit distributes it: one sample per question, options unrotated.

    The image column holds base64, or (for repeated images) the index of the row that does.
    Rows with index >= 1e6 are the TSV's own circular copies and are not read: `circular_variants`
    makes the rotations. The test split has no answers (it is scored by MMBench's server).
    """
    tsv = _single_file(path, "*.tsv", "an MMBench .tsv")
    csv.field_size_limit(2**31 - 1)  # base64 images are far larger than csv's default field limit
    images: dict[str, str] = {}
    with tsv.open(newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t")
        _require_columns(tsv, rows.fieldnames, ("index", "question", "A", "B", "answer", "image"))
        for n, row in enumerate(rows, 1):
            index = (row["index"] or "").strip() or str(n)
            image = (row["image"] or "").strip()
            image = images.get(image, image) if len(image) <= 64 else image
            images[index] = image
            if index.isdigit() and int(index) >= MMBENCH_COPY:
                continue
            options = {k: row[k].strip() for k in "ABCDEFGHI" if (row.get(k) or "").strip() not in ("", "nan")}
            answer = (row["answer"] or "").strip()
            if answer not in options:
                yield Skipped(index, f"{tsv.name}:{n}: answer {answer!r} is not one of the options {list(options)}")
                continue
            try:
                picture = base64.b64decode(image, validate=True)
            except binascii.Error:
                yield Skipped(index, f"{tsv.name}:{n}: image is not base64 (nor the index of a row with one)")
                continue
            hint, question = (row.get("hint") or "").strip(), (row["question"] or "").strip()
            question = f"{hint}\n{question}" if hint and hint != "nan" else question
            yield mcq_sample(index, question, options, answer, {"image": [picture]},
                             extra={"category": (row.get("category") or "").strip()})


def mcq_sample(sample_id: str, question: str, options: dict[str, str], answer: str, media: dict[str, list],
               extra: dict[str, Any]) -> Sample:
    """A multiple-choice prompt (MMBench's): media placeholders, the question, lettered options, the instruction."""
    placeholders = "".join(f"<{m}>" for m in MODALITIES for _ in media.get(m, []))
    lines = [f"{placeholders}\n{question}" if placeholders else question]
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    lines.append(MCQ_INSTRUCTION)
    return Sample(sample_id, _user("\n".join(lines)), answer, "mcq", media=media,
                  extra={**extra, "question": question, "options": options})


def circular_variants(sample: Sample) -> list[Sample]:
    """MMBench CircularEval: the question once per rotation of its options (n options: n variants).

    Rotation k moves option i+k to letter i, so the right letter moves too; a question
    counts as right only when every variant is answered right.
    """
    letters = list(sample.extra["options"])
    texts = list(sample.extra["options"].values())
    right = letters.index(sample.reference)
    variants = []
    for k in range(len(letters)):
        options = {letter: texts[(i + k) % len(texts)] for i, letter in enumerate(letters)}
        variants.append(mcq_sample(f"{sample.id}/{k}", sample.extra["question"], options,
                                   letters[(right - k) % len(letters)], sample.media,
                                   {**sample.extra, "question_id": sample.id, "rotation": k}))
    return variants


def read_videomme(root: Path) -> Iterator[Sample | Skipped]:
    """Video-MME: an annotation .json (a list) or .jsonl (videoID, duration, question_id, question,
    options ["A. ...", ...], answer) and `videos/` (or `data/`) holding <videoID>.mp4.

    The parquet form (the Hugging Face release) needs pyarrow, which omniforge does not install;
    convert it once: `pandas.read_parquet(p).to_json("videomme.json", orient="records")`.
    """
    annotation = _single_file(root, "*.json*", "a Video-MME annotation .json or .jsonl", also="*.parquet")
    videos = next((root / name for name in ("videos", "data") if (root / name).is_dir()), None)
    if videos is None:
        raise BenchmarkError(f"{root}: no videos/ (or data/) folder of <videoID>.mp4 files")
    for n, record in enumerate(_records(annotation)):
        if isinstance(record, Skipped):
            yield record
            continue
        sample_id = str(record.get("question_id", f"{annotation.name}[{n}]"))
        try:
            options = dict(_lettered(option) for option in record["options"])
            question, answer, video = str(record["question"]).strip(), str(record["answer"]).strip(), record["videoID"]
        except (KeyError, TypeError, ValueError) as e:
            yield Skipped(sample_id, f"{annotation.name}[{n}]: expected videoID, question, options ['A. ...'] and "
                                     f"answer ({type(e).__name__}: {e})")
            continue
        if answer not in options:
            yield Skipped(sample_id, f"{annotation.name}[{n}]: answer {answer!r} is not one of {list(options)}")
            continue
        prompt = VIDEOMME_PROMPT.format(question=question, options="\n".join(f"{k}. {v}" for k, v in options.items()))
        yield Sample(sample_id, _user(prompt), answer, "video_mcq", media={"video": [str(videos / f"{video}.mp4")]},
                     extra={"duration": str(record.get("duration", "")), "options": options,
                            "task_type": str(record.get("task_type", ""))})


def _lettered(option: str) -> tuple[str, str]:
    """("A", "text") from "A. text"."""
    match = re.fullmatch(r"\s*([A-Z])[.)]\s*(.*)", str(option), re.DOTALL)
    if match is None:
        raise ValueError(f"option {option!r} does not start with 'A.'")
    return match.group(1), match.group(2).strip()


# --------------------------------------------------------------------------- the training format


def read_jsonl(path: Path) -> Iterator[Sample | Skipped]:
    """JSONL in the training format; the last turn, the assistant's, is the reference.

    Optional fields: `metric` (one of JSONL_METRICS), else one chosen by `task` (asr: wer,
    translation: bleu, background: background, else exact_match); `id`; `system`; `pair_id`
    (the same question written and spoken: cross-modal consistency); `options` (mcq: a list
    like ["A. red", ...] or {"A": "red"}); `image_id` (yes_no: groups questions for accuracy+);
    `language` (bleu: the target language). Media paths are relative to the file's folder.
    """
    for n, record in enumerate(_records(path)):
        where = f"{path.name}[{n}]"
        if isinstance(record, Skipped):
            yield record
            continue
        try:
            yield _jsonl_sample(record, path.parent, where)
        except (BenchmarkError, KeyError, TypeError, ValueError, AttributeError) as e:
            reason = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            yield Skipped(str(record.get("id", where)) if isinstance(record, dict) else where, reason)


def _jsonl_sample(record: dict, folder: Path, where: str) -> Sample:
    messages = record["messages"]
    if not isinstance(messages, list) or len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise BenchmarkError("expected 'messages' ending with the assistant's answer (the reference)")
    answer = messages[-1]
    metric = record.get("metric") or TASK_METRICS.get(record.get("task"), "exact_match")
    if metric not in JSONL_METRICS:
        raise BenchmarkError(f"metric {metric!r} is not one of {JSONL_METRICS}")
    media = {m: [p if Path(p).is_absolute() else str(folder / p) for p in record.get(m + "s") or []] for m in MODALITIES}
    extra = {key: record[key] for key in ("task", "pair_id", "language") if key in record}
    if not isinstance(extra.get("language", ""), str):
        raise BenchmarkError(f"'language' must be a language code like \"de\", got {extra['language']!r}")
    reference = str(answer.get("content") or "")
    if isinstance(answer.get("heard"), str):  # what a spoken question says, as the answer repeats it first
        extra["heard"] = answer["heard"]
    if metric == "background":
        extra["addressed"] = bool(reference.strip()) and answer.get("state") != "background"
    if metric == "yes_no":
        extra["image"] = str(record.get("image_id") or (media["image"] or [where])[0])
        if (label := yes_no_label(reference)) == "other":
            raise BenchmarkError(f"a yes_no answer must say yes or no, got {reference!r}")
        reference = label
    if metric == "mcq":
        options = record.get("options") or {letter: "" for letter in "ABCD"}
        extra["options"] = dict(options) if isinstance(options, dict) else dict(_lettered(o) for o in options)
        if (letter := extract_choice(reference, extra["options"])) is None:
            raise BenchmarkError(f"the mcq answer {reference!r} names none of the options {extra['options']}")
        reference = letter
    return Sample(str(record.get("id", where)), messages[:-1], reference, metric, media=media,
                  system=record.get("system"), extra=extra)


# --------------------------------------------------------------------------- shared


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def _lines(file: Path) -> list[tuple[int, str]]:
    """(line number from 1, line) of the non-blank lines, line ends stripped; undecodable bytes
    replaced, not fatal."""
    text = file.read_text(encoding="utf-8-sig", errors="replace")
    return [(n, line.rstrip("\r")) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _records(path: Path) -> Iterator[dict | Skipped]:
    """The objects of a JSON list or of JSONL lines; an unparseable line or an entry that is not
    an object becomes a Skipped."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(records, list):
            raise BenchmarkError(f"{path}: expected a JSON list of records")
    else:
        records = []
        for n, line in enumerate(line for line in text.splitlines() if line.strip()):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                records.append(Skipped(f"{path.name}[{n}]", f"invalid JSON ({e.msg})"))
    for n, record in enumerate(records):
        ok = isinstance(record, (dict, Skipped))
        yield record if ok else Skipped(f"{path.name}[{n}]", f"expected a JSON object, got {type(record).__name__}")


def _single_file(path: Path, pattern: str, what: str, also: str | None = None) -> Path:
    """`path` itself, or the one file matching `pattern` in the folder `path`."""
    if path.is_file():
        return path
    found = sorted(path.glob(pattern))
    if len(found) == 1:
        return found[0]
    if not found and also and list(path.glob(also)):
        raise BenchmarkError(f"{path}: only {also} annotations found; reading them needs pyarrow (not installed): "
                             "convert to JSON first (see omniforge.eval.readers.read_videomme)")
    named = f"{len(found)} files match {pattern}: name one" if found else f"no {pattern} file"
    raise BenchmarkError(f"{path}: expected {what} ({named})")


def _require_columns(file: Path, columns: list[str] | None, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in (columns or [])]
    if missing:
        raise BenchmarkError(f"{file}: missing column(s) {missing} (has {columns})")


KINDS: dict[str, Callable[[Path], Iterator[Sample | Skipped]]] = {
    "librispeech": read_librispeech, "aishell": read_aishell, "mme": read_mme, "mmbench": read_mmbench,
    "videomme": read_videomme, "covost": read_covost, "jsonl": read_jsonl, "synth": read_jsonl,
}
"""Reader by `--task` kind. `jsonl` and `synth` take a file, or a folder of files (one task each)."""
