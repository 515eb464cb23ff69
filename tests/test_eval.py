"""Evaluation: metrics on hand-computed examples, readers on tiny benchmarks in their real layouts,
the runner and `omniforge eval` end to end on the tiny random model, and the harness adapters."""

import argparse
import base64
import copy
import csv
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from omniforge.data.dataset import SampleCache
from omniforge.data.media_writers import write_audio, write_video
from omniforge.errors import OmniforgeError
from omniforge.eval import metrics, readers
from omniforge.eval.cli import add_parser, run
from omniforge.eval.harness import OmniforgeChat, OmniforgeLmms, OmniforgeVLM, generation_config, media_item
from omniforge.eval.readers import BenchmarkError, Sample, Skipped, circular_variants, load_tasks, parse_task_spec
from omniforge.eval.runner import Prediction, compare_markdown, evaluate, judge, predict, score
from omniforge.model.generate import GenerationConfig
from omniforge.processing.chat import OmniProcessor

# --------------------------------------------------------------------------- tiny media and benchmarks


def tone(seconds: float = 0.4, hz: float = 440.0, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.2 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def picture(colour=(200, 30, 30), size=32) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def png_bytes(colour) -> bytes:
    out = io.BytesIO()
    picture(colour).save(out, format="PNG")
    return out.getvalue()


def make_librispeech(root: Path) -> Path:
    chapter = root / "test-clean" / "1089" / "134686"
    chapter.mkdir(parents=True)
    (chapter / "1089-134686.trans.txt").write_text("1089-134686-0000 HE HOPED THERE WOULD BE STEW\n"
                                                   "1089-134686-0001 STUFF IT INTO YOU\n")
    for i in range(2):
        write_audio(chapter / f"1089-134686-000{i}.flac", tone(hz=300 + 100 * i))
    return root / "test-clean"


def make_aishell(root: Path) -> Path:
    (root / "transcript").mkdir(parents=True)
    (root / "transcript" / "aishell_transcript_v0.8.txt").write_text("BAC009S0764W0121 甚至 出现 交易 几乎 停滞 的 情况\n")
    speaker = root / "wav" / "test" / "S0764"
    speaker.mkdir(parents=True)
    write_audio(speaker / "BAC009S0764W0121.wav", tone())
    write_audio(speaker / "BAC009S0764W0122.wav", tone())  # no transcript line: skipped, as Kaldi drops it
    return root


def make_mme(root: Path) -> Path:
    artwork = root / "artwork"  # images/ + questions_answers_YN/
    (artwork / "images").mkdir(parents=True)
    (artwork / "questions_answers_YN").mkdir()
    picture((10, 10, 200)).save(artwork / "images" / "art1.jpg")
    (artwork / "questions_answers_YN" / "art1.txt").write_text("Is this blue? Please answer yes or no.\tYes\n"
                                                                "Is this red? Please answer yes or no.\tNo\n")
    count = root / "count"  # images with same-named .txt beside them
    count.mkdir()
    picture().save(count / "c1.png")
    (count / "c1.txt").write_text("Is there one square? Please answer yes or no.\tYes\n"
                                  "Are there two squares? Please answer yes or no.\tNo\n")
    (count / "broken.png").write_bytes(b"not a png at all")  # corrupt: skipped when encoded
    (count / "broken.txt").write_text("Is there a square? Please answer yes or no.\tYes\n")
    (count / "lonely.txt").write_text("Is there a circle?\tNo\nno tab on this line\n")  # no image; malformed line
    return root


def make_mmbench(path: Path) -> Path:
    rows = [
        {"index": "0", "question": "What colour is the square?", "hint": "", "A": "red", "B": "green", "C": "blue",
         "D": "black", "answer": "C", "category": "color", "image": base64.b64encode(png_bytes((0, 0, 255))).decode()},
        {"index": "1", "question": "Is it bright?", "hint": "Look closely.", "A": "yes", "B": "no", "C": "", "D": "",
         "answer": "A", "category": "light", "image": "0"},  # the image given by the index of the row holding it
        {"index": "1000000", "question": "What colour is the square?", "hint": "", "A": "blue", "B": "black",
         "C": "red", "D": "green", "answer": "A", "category": "color", "image": "0"},  # the TSV's own circular copy
        {"index": "2", "question": "Broken?", "hint": "", "A": "x", "B": "y", "C": "", "D": "", "answer": "E",
         "category": "color", "image": "0"},
    ]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_videomme(root: Path) -> Path:
    (root / "videos").mkdir(parents=True)
    frames = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(6)]
    write_video(root / "videos" / "vid001.mp4", frames, fps=6)
    records = [{"video_id": "001", "duration": "short", "domain": "Knowledge", "videoID": "vid001", "question_id": "001-1",
                "task_type": "Counting Problem", "question": "How many frames are dark?",
                "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": "B"},
               {"video_id": "001", "duration": "long", "videoID": "vid001", "question_id": "001-2",
                "question": "What happens?", "options": ["A. It fades.", "B. It brightens."], "answer": "B"},
               {"videoID": "vid001", "question_id": "001-3", "question": "Bad", "options": "not a list", "answer": "A"}]
    (root / "videomme.json").write_text(json.dumps(records))
    return root


def make_covost(root: Path) -> Path:
    (root / "clips").mkdir(parents=True)
    write_audio(root / "clips" / "common_voice_en_1.mp3", tone(0.6))
    tsv = root / "covost_v2.en_de.test.tsv"
    tsv.write_text("path\tsentence\ttranslation\tclient_id\n"
                   "common_voice_en_1.mp3\tThe cat sleeps.\tDie Katze schläft.\tabc\n"
                   "common_voice_en_2.mp3\tNo translation.\t\tabc\n")
    return tsv


def make_synth(root: Path) -> Path:
    """A synthetic-world test split: one JSONL per task in the training format, media beside it."""
    root.mkdir(parents=True)
    picture((220, 40, 40)).save(root / "red.png")
    write_audio(root / "speech.wav", tone(0.5))
    write_audio(root / "chatter.wav", tone(0.5, hz=150))

    def convo(user, answer, **fields):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **fields}

    files = {
        "image_qa": [convo("<image>\nWhat colour is the shape?", "Red.", images=["red.png"], task="image_qa"),
                     convo("<image>\nWhat shape is it?", "a square", images=["red.png"], task="image_qa")],
        "asr": [convo("<audio>\nTranscribe the speech.", "the red square", audios=["speech.wav"], task="asr")],
        "background": [convo("<audio>", "", audios=["chatter.wav"], task="background"),
                       convo("<audio>", "It is red.", audios=["speech.wav"], task="background")],
        "spoken_qa": [convo("<image>\nWhat colour is the shape?", "red", images=["red.png"], pair_id="q1"),
                      convo("<image><audio>", "red", images=["red.png"], audios=["speech.wav"], pair_id="q1")],
    }
    for name, records in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with (root / "image_qa.jsonl").open("a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "no answer turn"}]}) + "\n")
    return root


# --------------------------------------------------------------------------- metrics


def test_exact_match_normalises_case_punctuation_and_articles():
    assert metrics.normalize_answer("The  Red, circle!") == "red circle"
    assert metrics.exact_match(["A red circle.", "blue", "two"], ["red circle", "Blue", "three"]) == pytest.approx(200 / 3)


@pytest.mark.parametrize("answer,label", [("Yes", "yes"), (" no.", "no"), ("Yes, there is a dog.", "yes"),
                                          ("No, it is not.", "no"), ("not sure", "no"), ("I think so", "other"),
                                          ("There is a yes", "other")])
def test_yes_no_label_follows_mme(answer, label):
    assert metrics.yes_no_label(answer) == label


def test_mme_scores_are_accuracy_plus_accuracy_plus_summed_by_category_lists():
    categories = ["existence"] * 4 + ["OCR"] * 2 + ["code_reasoning"] * 2
    images = ["e1", "e1", "e2", "e2", "o1", "o1", "c1", "c1"]
    correct = [True, True, True, False, True, True, True, False]
    scores = metrics.mme_scores(categories, images, correct)
    assert scores["existence"] == pytest.approx(75 + 50)    # 3/4 questions, 1/2 images with both right
    assert scores["OCR"] == pytest.approx(100 + 100)
    assert scores["code_reasoning"] == pytest.approx(50 + 0)
    assert scores["perception"] == pytest.approx(125 + 200)
    assert scores["cognition"] == pytest.approx(50)
    assert scores["accuracy"] == pytest.approx(75) and scores["accuracy_plus"] == pytest.approx(50)


OPTIONS = {"A": "red apple", "B": "blue car", "C": "green", "D": "dog"}


@pytest.mark.parametrize("answer,choice", [
    ("B", "B"), ("(b)", "B"), ("C.", "C"), ("B. blue car", "B"), ("(C) green", "C"), ("D, because it barks", "D"),
    ("Answer: D", "D"), ("The correct answer is (C).", "C"), ("It is a blue car.", "B"), ("I pick B", "B"),
    ("B is right", "B"), ("A is right", "A"), ("A cat sits there", None), ("Either B or C", None), ("no idea", None),
    ("", None), ("Not the dog, so B", "B"), ("hotdogs", None), ("Green!", "C"),
])
def test_extract_choice_by_rules(answer, choice):
    assert metrics.extract_choice(answer, OPTIONS) == choice


def test_a_letter_inside_an_options_text_names_that_option_not_the_letter():
    vitamins = {"A": "Vitamin A", "B": "Vitamin D", "C": "Vitamin C", "D": "Iron"}
    assert metrics.extract_choice("It is Vitamin D.", vitamins) == "B"
    assert metrics.extract_choice("The answer is Vitamin D", vitamins) == "B"
    assert metrics.extract_choice("Not vitamin C, so D", vitamins) == "D"


def test_circular_eval_needs_every_rotation_right():
    questions = ["q1"] * 4 + ["q2"] * 2
    rotations = [0, 1, 2, 3, 0, 1]
    categories = ["color"] * 4 + ["light"] * 2
    correct = [True, True, True, True, True, False]
    scores = metrics.mmbench_scores(questions, rotations, categories, correct)
    assert scores == {"circular_accuracy": 50.0, "vanilla_accuracy": 100.0, "category/color": 100.0,
                      "category/light": 0.0}


def test_video_mme_accuracy_by_duration_bucket():
    scores = metrics.duration_scores(["long", "short", "short", "medium"], [True, True, False, False])
    assert list(scores) == ["accuracy", "accuracy_short", "accuracy_medium", "accuracy_long"]
    assert scores == {"accuracy": 50.0, "accuracy_short": 50.0, "accuracy_medium": 0.0, "accuracy_long": 100.0}


def test_wer_is_corpus_level_after_whisper_normalisation():
    # 1 insertion + 1 deletion over 5 reference words: 40%, not the 41.7% mean of per-utterance rates
    assert metrics.wer(["The cat sat down.", "hello"], ["the cat sat", "hello world"]) == pytest.approx(40.0)
    assert metrics.wer(["mister smith paid five dollars"], ["Mr. Smith paid $5."]) == 0.0


def test_cer_ignores_punctuation_and_spaces_in_chinese():
    assert metrics.cer(["甚至出现，交易。"], ["甚至 出现 交易"]) == 0.0
    assert metrics.cer(["甚至出现交易", "你好"], ["甚至 出现 交易", "你好吗"]) == pytest.approx(100 / 9)


def test_bleu_and_chrf_are_sacrebleu_corpus_scores():
    # every n-gram precision is 1; brevity penalty exp(1 - 5/4)
    assert metrics.bleu_chrf(["a b c d"], ["a b c d e"])["bleu"] == pytest.approx(100 * np.exp(-0.25))
    same = metrics.bleu_chrf(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == {"bleu": pytest.approx(100), "chrf": pytest.approx(100)}
    assert metrics.bleu_chrf(["我喜欢狗"], ["我喜欢猫"], language="de")["bleu"] == 0.0   # one 13a token each
    assert metrics.bleu_chrf(["我喜欢狗"], ["我喜欢猫"], language="zh-CN")["bleu"] > 50  # characters


def test_consistency_and_background_rejection():
    assert metrics.consistency(["Red.", "two", "a dog"], ["red", "three", "the dog"]) == pytest.approx(200 / 3)
    ignored, addressed = [True, True, False, True, False], [False, False, False, True, True]
    assert metrics.background_rejection(ignored, addressed) == {"rejection": pytest.approx(200 / 3),
                                                                "false_rejection": 50.0}
    assert metrics.is_blank(" \n") and not metrics.is_blank(" ok")


# --------------------------------------------------------------------------- readers


def test_task_spec_parsing():
    assert parse_task_spec("mme=/data/MME") == parse_task_spec("mme:mme=/data/MME")
    spec = parse_task_spec("clean:librispeech=~/LibriSpeech/test-clean")
    assert (spec.label, spec.kind, spec.path.name) == ("clean", "librispeech", "test-clean")
    with pytest.raises(BenchmarkError, match="unknown kind 'mmlu'"):
        parse_task_spec("mmlu=/data")
    with pytest.raises(BenchmarkError, match="expected KIND=PATH"):
        parse_task_spec("/data/MME")


def test_librispeech_reader(tmp_path):
    samples = list(readers.read_librispeech(make_librispeech(tmp_path)))
    assert [s.id for s in samples] == ["1089-134686-0000", "1089-134686-0001"]
    assert samples[0].reference == "HE HOPED THERE WOULD BE STEW" and samples[0].metric == "wer"
    assert Path(samples[1].media["audio"][0]).is_file()
    assert samples[0].messages[0]["content"].count("<audio>") == 1
    with pytest.raises(BenchmarkError, match="LibriSpeech split folder"):
        list(readers.read_librispeech(tmp_path / "test-clean" / "1089"))


def test_aishell_reader(tmp_path):
    items = list(readers.read_aishell(make_aishell(tmp_path)))
    assert items[0].reference == "甚至出现交易几乎停滞的情况" and items[0].metric == "cer"
    assert isinstance(items[1], Skipped) and items[1].id == "BAC009S0764W0122"


def test_mme_reader_reads_both_layouts(tmp_path):
    items = list(readers.read_mme(make_mme(tmp_path)))
    samples = [i for i in items if isinstance(i, Sample)]
    assert [s.id for s in samples] == ["artwork/art1/0", "artwork/art1/1", "count/broken/0", "count/c1/0", "count/c1/1"]
    assert samples[0].media["image"][0].endswith("images/art1.jpg") and samples[0].reference == "Yes"
    assert samples[3].extra == {"category": "count", "image": "c1"}
    assert sorted(i.id for i in items if isinstance(i, Skipped)) == ["count/lonely/0", "count/lonely/1"]
    with pytest.raises(BenchmarkError, match="no MME category folders"):
        list(readers.read_mme(tmp_path / "artwork" / "images"))
    with pytest.raises(BenchmarkError, match="is not a folder"):
        load_tasks(parse_task_spec(f"mme={tmp_path / 'count' / 'c1.txt'}"))
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_tasks(parse_task_spec(f"mme={tmp_path / 'MME'}"))


def test_mmbench_reader_and_circular_rotations(tmp_path):
    tsv = make_mmbench(tmp_path / "MMBench_DEV_EN.tsv")
    items = list(readers.read_mmbench(tsv))
    assert [i.id for i in items] == ["0", "1", "2"] and isinstance(items[2], Skipped)  # the 1e6 copy is not read
    assert items[1].media["image"][0] == png_bytes((0, 0, 255))                         # image by row index
    assert items[1].extra["options"] == {"A": "yes", "B": "no"}
    assert items[1].messages[0]["content"].startswith("<image>\nLook closely.\nIs it bright?\nA. yes\nB. no\n")

    variants = circular_variants(items[0])
    assert [v.id for v in variants] == ["0/0", "0/1", "0/2", "0/3"]
    assert [v.reference for v in variants] == ["C", "B", "A", "D"]  # "blue" moves one letter up each rotation
    assert all(v.extra["options"][v.reference] == "blue" for v in variants)
    assert variants[1].extra["options"] == {"A": "green", "B": "blue", "C": "black", "D": "red"}

    (task,) = load_tasks(parse_task_spec(f"mmbench={tsv}"), limit=2)  # the limit counts questions
    assert len(task.items) == 4 + 2


def test_videomme_reader(tmp_path):
    root = make_videomme(tmp_path / "Video-MME")
    items = list(readers.read_videomme(root))
    assert [type(i).__name__ for i in items] == ["Sample", "Sample", "Skipped"]
    first = items[0]
    assert first.metric == "video_mcq" and first.reference == "B" and first.extra["duration"] == "short"
    assert first.extra["options"] == {"A": "One.", "B": "Two.", "C": "Three.", "D": "Four."}
    assert "B. Two.\nC. Three." in first.messages[0]["content"] and first.media["video"][0].endswith("vid001.mp4")
    parquet_only = tmp_path / "pq"
    (parquet_only / "videos").mkdir(parents=True)
    (parquet_only / "test-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(BenchmarkError, match="pyarrow"):
        list(readers.read_videomme(parquet_only))


def test_covost_reader(tmp_path):
    items = list(readers.read_covost(make_covost(tmp_path)))
    assert items[0].reference == "Die Katze schläft." and items[0].extra["language"] == "de"
    assert "into German" in items[0].messages[0]["content"] and items[0].media["audio"][0].endswith("clips/common_voice_en_1.mp3")
    assert isinstance(items[1], Skipped)


def test_synth_folder_is_one_task_per_file_with_metrics_from_records(tmp_path):
    tasks = {t.name: t for t in load_tasks(parse_task_spec(f"synth={make_synth(tmp_path / 'synth')}"))}
    assert sorted(tasks) == ["synth/asr", "synth/background", "synth/image_qa", "synth/spoken_qa"]
    image_qa = tasks["synth/image_qa"].items
    assert [type(i).__name__ for i in image_qa] == ["Sample", "Sample", "Skipped", "Skipped"]
    assert image_qa[0].metric == "exact_match" and image_qa[0].media["image"] == [str(tmp_path / "synth" / "red.png")]
    assert "invalid JSON" in image_qa[2].reason and "assistant" in image_qa[3].reason
    assert tasks["synth/asr"].items[0].metric == "wer"
    assert [s.extra["addressed"] for s in tasks["synth/background"].items] == [False, True]
    assert {s.extra["pair_id"] for s in tasks["synth/spoken_qa"].items} == {"q1"}
    assert all(t.group == "synth" for t in tasks.values())


def test_jsonl_references_are_read_as_scored_and_unscorable_records_skipped(tmp_path):
    def record(id, answer, **fields):
        return {"id": id, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
                **fields}

    lines = [record("yes", "Yes, it is red.", metric="yes_no"), record("maybe", "Maybe", metric="yes_no"),
             record("twelve", "12", metric="mcq", options=["A. 2", "B. 12", "C. 3"]),
             record("seven", "seven", metric="mcq", options=["A. 2", "B. 12", "C. 3"]),
             record("nolang", "Hallo", metric="bleu", language=None)]
    lines[0]["messages"][-1]["heard"] = "is it red"
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n[1, 2]\n")
    items = {item.id: item for item in readers.read_jsonl(path)}
    assert items["yes"].reference == "yes" and items["twelve"].reference == "B"
    assert items["yes"].extra["heard"] == "is it red" and "heard" not in items["twelve"].extra
    assert "yes or no" in items["maybe"].reason and "names none of the options" in items["seven"].reason
    assert "language" in items["nolang"].reason and "expected a JSON object" in items["mixed.jsonl[5]"].reason


# --------------------------------------------------------------------------- runner


def answered(sample: Sample, text: str) -> Prediction:
    return Prediction(sample, text, judge(sample, text))


def test_scores_from_known_answers(tmp_path):
    question = readers.read_mmbench(make_mmbench(tmp_path / "mmb.tsv"))
    variants = circular_variants(next(question))
    right = [answered(v, f"{v.reference}.") for v in variants]
    assert score(right) == {"circular_accuracy": 100.0, "vanilla_accuracy": 100.0, "category/color": 100.0}
    one_wrong = right[:3] + [answered(variants[3], "A")]
    assert score(one_wrong)["circular_accuracy"] == 0.0 and score(one_wrong)["vanilla_accuracy"] == 100.0

    mixed = [answered(Sample("1", [], "red", "exact_match"), "Red."),
             answered(Sample("2", [], "the cat", "wer"), "the hat"),
             answered(Sample("3", [], "", "background", extra={"addressed": False}), "  ")]
    assert score(mixed) == {"exact_match/exact_match": 100.0, "wer/wer": 50.0, "background/rejection": 100.0}

    def spoken(id, heard, answer, said):  # an answer to a spoken question says first what it heard
        sample = Sample(id, [], "red", "exact_match", extra={"heard": heard})
        return Prediction(sample, answer, judge(sample, answer), said)

    heard = [spoken("1", "what colour is the circle", "red", "What colour is the circle?"),
             spoken("2", "what colour is the circle", "red", "what colour is a circle"),  # articles count here
             spoken("3", "what colour is the square", "blue", None),  # cut off before the transcript closed
             answered(Sample("4", [], "red", "exact_match"), "red")]  # a written question: no transcript to score
    assert score(heard) == {"exact_match": 75.0, "heard": pytest.approx(100 / 3)}

    mat = "the cat sat on the mat"
    translated = [answered(Sample("zh", [], "我喜欢猫", "bleu", extra={"language": "zh"}), "我喜欢狗"),
                  answered(Sample("en", [], mat, "bleu", extra={"language": "en"}), mat)]
    by_language = score(translated)  # each target language with its own tokenizer: Chinese by characters
    assert set(by_language) == {"bleu/en", "chrf/en", "bleu/zh", "chrf/zh"}
    assert by_language["bleu/en"] == pytest.approx(100) and 0 < by_language["bleu/zh"] < 100


def test_evaluate_end_to_end_on_the_tiny_model(omni_model, tmp_path):
    specs = [f"mme={make_mme(tmp_path / 'MME')}", f"mmbench={make_mmbench(tmp_path / 'mmb.tsv')}",
             f"librispeech={make_librispeech(tmp_path / 'LibriSpeech')}", f"videomme={make_videomme(tmp_path / 'vmme')}",
             f"covost={make_covost(tmp_path / 'covost')}", f"synth={make_synth(tmp_path / 'synth')}"]
    tasks = [t for spec in specs for t in load_tasks(parse_task_spec(spec))]
    out = tmp_path / "out"
    results = evaluate(omni_model, tasks, out, batch_size=3, max_new_tokens=4, progress=False)

    entries = {e["task"]: e for e in json.loads((out / "scores.json").read_text())}
    assert list(entries) == [t.name for t in tasks] + ["synth/consistency"]
    assert [(e["samples"], e["skipped"]) for e in entries.values()] == [
        (4, 3), (6, 1), (2, 0), (2, 1), (1, 1), (1, 0), (2, 0), (2, 2), (2, 0), (1, 0)]
    assert set(entries["mme"]["metrics"]) == {"perception", "accuracy", "accuracy_plus", "artwork", "count"}
    assert set(entries["videomme"]["metrics"]) == {"accuracy", "accuracy_short", "accuracy_long"}
    assert set(entries["covost"]["metrics"]) == {"bleu", "chrf"}
    assert set(entries["synth/background"]["metrics"]) == {"rejection", "false_rejection"}

    for task in tasks:  # one line per item, in order, skipped ones with their reason
        lines = [json.loads(line) for line in (out / "predictions" / f"{task.name}.jsonl").read_text().splitlines()]
        assert [line["id"] for line in lines] == [item.id for item in task.items]
    mme = [json.loads(line) for line in (out / "predictions" / "mme.jsonl").read_text().splitlines()]
    assert "count/broken.png" in next(p["skipped"] for p in mme if p["id"] == "count/broken/0")
    scored = [p for p in mme if "prediction" in p]  # the scores are the predictions' verdicts, aggregated
    assert entries["mme"]["metrics"]["accuracy"] == pytest.approx(100 * sum(p["correct"] for p in scored) / len(scored))
    assert all(p["parsed"] == metrics.yes_no_label(p["prediction"]) for p in scored)

    with pytest.raises(OmniforgeError, match="task names must differ"):
        evaluate(omni_model, tasks[:1] * 2, out)

    table = (out / "scores.md").read_text()
    assert "| mme | perception |" in table and "| librispeech | wer (lower is better) |" in table
    other = [{"task": "librispeech", "metrics": {"wer": results[2].metrics["wer"] + 10}, "samples": 2, "skipped": 0}]
    assert "| librispeech | wer (lower is better) |" in compare_markdown(results, other)
    assert "| -10.00 |" in compare_markdown(results, other)


def test_batching_does_not_change_answers(omni_model, tmp_path):
    items = load_tasks(parse_task_spec(f"mme={make_mme(tmp_path / 'MME')}"))[0].items
    processor = OmniProcessor.from_model(omni_model)
    one = predict(omni_model, processor, items, batch_size=1, max_new_tokens=5, progress=False)
    four = predict(omni_model, processor, items, batch_size=4, max_new_tokens=5, progress=False)
    assert [getattr(o, "text", None) for o in one] == [getattr(o, "text", None) for o in four]


def test_a_cache_of_encoded_prompts_serves_the_next_run_the_same_answers(omni_model, tmp_path):
    tasks = [t for spec in (f"mme={make_mme(tmp_path / 'MME')}", f"synth={make_synth(tmp_path / 'synth')}")
             for t in load_tasks(parse_task_spec(spec))]
    cache = SampleCache(2**30)
    first = evaluate(omni_model, tasks, tmp_path / "first", batch_size=3, max_new_tokens=4, progress=False, cache=cache)
    encodable, misses = len(cache), cache.misses
    assert cache.hits == 0 and encodable > 0
    again = evaluate(omni_model, tasks, tmp_path / "again", batch_size=3, max_new_tokens=4, progress=False, cache=cache)
    assert cache.hits == encodable and len(cache) == encodable  # the prompts whose media fail to load miss again
    assert cache.misses - misses == misses - encodable
    assert [r.metrics for r in again] == [r.metrics for r in first]
    for task in tasks:
        assert ((tmp_path / "again" / "predictions" / f"{task.name}.jsonl").read_text()
                == (tmp_path / "first" / "predictions" / f"{task.name}.jsonl").read_text())


def test_cli_writes_scores_and_compares(omni_model, tmp_path, capsys):
    omni_model.save_pretrained(tmp_path / "ckpt")
    synth = make_synth(tmp_path / "synth")
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps([{"task": "mine/image_qa", "metrics": {"exact_match": 50.0}, "samples": 2,
                                     "skipped": 0}]))
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--task", f"mine:jsonl={synth}",
                              "--task", f"mme={make_mme(tmp_path / 'MME')}", "--limit", "2", "--batch-size", "2",
                              "--max-new-tokens", "3", "--out", str(tmp_path / "out"), "--compare", str(previous),
                              "--device", "cpu"])
    assert run(args) == 0
    printed = capsys.readouterr().out
    scores = {e["task"]: e for e in json.loads((tmp_path / "out" / "scores.json").read_text())}
    assert scores["mine/image_qa"]["samples"] == 2 and scores["mme"]["samples"] == 2  # --limit 2 per task
    assert (tmp_path / "out" / "scores.md").read_text() in printed
    now = scores["mine/image_qa"]["metrics"]["exact_match"]
    assert f"| mine/image_qa | exact_match | {now:.2f} | 50.00 | {now - 50:+.2f} |" in printed

    args.task = ["nope=/nowhere"]
    with pytest.raises(BenchmarkError):
        run(args)
    args.task, args.checkpoint = [f"jsonl={synth}"] * 2, tmp_path / "no-checkpoint"  # named alike: caught before loading
    with pytest.raises(OmniforgeError, match="task names must differ"):
        run(args)


# --------------------------------------------------------------------------- harness adapters


def reference_answer(model, content: str, media: dict, max_new_tokens: int) -> str:
    """The answer computed directly with the processor and generate, to check the adapters against."""
    from omniforge.eval.runner import generate_completions

    processor = OmniProcessor.from_model(model)
    encoded = processor.encode([{"role": "user", "content": content}], media, add_generation_prompt=True)
    return generate_completions(model, processor, [encoded], GenerationConfig(max_new_tokens=max_new_tokens))[0].text


def request(*args):
    return SimpleNamespace(args=args)


def test_lmms_eval_adapter_generates_and_scores_continuations(omni_model):
    lmms = OmniforgeLmms(model=omni_model, batch_size=2, max_new_tokens=6)
    image, waveform = picture(), tone(0.5, rate=8_000)
    docs = [{"image": image}, {"audio": {"array": waveform.astype(np.float64), "sampling_rate": 8_000}}, {}]
    lmms.task_dict = {"toy": {"test": docs}}
    visual = {0: lambda d: [d["image"]], 1: lambda d: [d["audio"]], 2: lambda d: []}
    kwargs = {"until": ["\n\n"], "max_new_tokens": 5, "do_sample": False}
    answers = lmms.generate_until([request("What is this?", kwargs, visual[i], i, "toy", "test") for i in range(3)])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert answers[0] == reference_answer(omni_model, "<image>\nWhat is this?", {"image": [image]}, 5)
    kind, resampled = media_item(docs[1]["audio"])
    assert kind == "audio" and resampled.dtype == np.float32 and resampled.shape == (8_000,)  # 0.5 s at 16 kHz
    assert answers[1] == reference_answer(omni_model, "<audio>\nWhat is this?", {"audio": [resampled]}, 5)

    (short, _), (longer, _), (from_doc, _) = lmms.loglikelihood([
        request("Name the colour.", "re", visual[0], 0, "toy", "test"),
        request("Name the colour.", "red", visual[0], 0, "toy", "test"),
        request("Name the colour.", lambda doc: "red", visual[0], 0, "toy", "test")])
    assert longer < short < 0 and from_doc == longer  # log p("red") = log p("re") + log p("d" | "re")
    with pytest.raises(NotImplementedError):
        lmms.generate_until_multi_round([])


def test_loglikelihood_is_exact_where_every_token_is_equally_likely(omni_model):
    model = copy.deepcopy(omni_model)
    torch.nn.init.zeros_(model.llm.get_output_embeddings().weight)  # uniform next-token distribution
    chat = OmniforgeChat(model=model)
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    first = model.tokenizer.convert_ids_to_tokens(0)  # argmax ties go to the first id, so greedy repeats it
    logprob, greedy = chat.loglikelihood("Say something.", [], first * 3)
    assert logprob == pytest.approx(-3 * math.log(vocab), rel=1e-5) and greedy is True
    assert chat.loglikelihood("Say something.", [], first * 2 + "x")[1] is False


def test_vlmevalkit_adapter_takes_interleaved_messages(omni_model, tmp_path):
    picture().save(tmp_path / "square.png")
    write_audio(tmp_path / "q.wav", tone())
    vlm = OmniforgeVLM(model=omni_model, max_new_tokens=4)
    message = [{"type": "image", "value": str(tmp_path / "square.png")}, {"type": "text", "value": "What is this?"}]
    assert vlm.generate(message, dataset="MME") == reference_answer(
        omni_model, "<image>\nWhat is this?", {"image": [str(tmp_path / "square.png")]}, 4)
    assert isinstance(vlm.generate([{"type": "audio", "value": str(tmp_path / "q.wav")}]), str)
    with pytest.raises(ValueError, match="Invalid input type"):
        vlm.generate([{"type": "pointcloud", "value": "x"}])


def test_generation_kwargs_map_to_a_generation_config():
    config = generation_config({"until": "###", "max_new_tokens": 7, "temperature": 0}, 100)
    assert (config.stop, config.max_new_tokens, config.temperature) == (["###"], 7, 0.0)
    sampled = generation_config({"do_sample": True, "temperature": 0.5, "top_p": 0.9}, 100)
    assert (sampled.max_new_tokens, sampled.temperature, sampled.top_p) == (100, 0.5, 0.9)

