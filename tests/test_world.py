"""The synthetic world (deterministic, held-out test conditions, real media) and the demo."""

import hashlib
import json
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from omniforge.data.synthetic import scenes, speech
from omniforge.data.synthetic import world as world_module
from omniforge.data.synthetic.world import WorldSize, synthesize_world
from omniforge.errors import ConfigError
from omniforge.eval.readers import TaskSpec, load_tasks

SMALL = WorldSize(caption=4, image_qa=6, image_lookups=4, image_sizes=4, ocr=3, hires=3, video_qa=4, video_directions=8,
                  video_directions_all_lengths=6, asr=5, translation=3, spoken_qa=4, spoken_lookups=4, background=4,
                  text_qa=4, text_lm=6, eval_size=4)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".jsonl", ".png", ".flac", ".mp4", ".json")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthesize_world(tmp_path_factory.mktemp("world"), seed=3, size=SMALL, log=lambda _: None)


def test_world_is_deterministic_per_seed(world, tmp_path):
    again = synthesize_world(tmp_path / "again", seed=3, size=SMALL, log=lambda _: None)
    other = synthesize_world(tmp_path / "other", seed=4, size=SMALL, log=lambda _: None)
    assert digest(world) == digest(again)
    assert digest(world) != digest(other)


def test_every_split_has_its_tasks_in_the_training_format(world):
    for split in ("train", "val", "test"):
        names = {p.stem for p in (world / split).glob("*.jsonl")}
        assert {"image_qa", "ocr", "hires", "video_qa", "asr", "translation", "spoken_qa", "background",
                "text_qa"} <= names
    train_only = {"caption", "image_lookups", "image_sizes", "spoken_lookups", "written_lookups", "spoken_left",
                  "written_left", "text_lm", "video_directions", "video_directions_all_lengths"}
    assert train_only <= {p.stem for p in (world / "train").glob("*.jsonl")}
    for file in (world / "test").glob("*.jsonl"):
        for line in file.read_text().splitlines():
            record = json.loads(line)
            assert record["messages"][-1]["role"] == "assistant" and record["metric"]
            for kind in ("images", "videos", "audios"):
                for path in record.get(kind, []):
                    assert (file.parent / path).is_file()


def test_test_split_holds_out_voices_rates_and_combinations():
    train, test = speech.voices("train"), speech.voices("test")
    assert not set(train) & set(test)
    assert all(v.rate in speech.TEST_RATES for v in test) and all(v.rate in speech.TRAIN_RATES for v in train)
    assert all(p not in scenes.pairs("train") for p in scenes.HELD_OUT)
    assert all(p in scenes.pairs("test") for p in scenes.HELD_OUT)
    assert set(scenes.pairs("held_out")) == scenes.HELD_OUT  # what the stand-in tower is also scored on


class _SpeechRecorder:
    """Stands in for the world's speech pool: keeps what it is asked to say (`_speak`'s arguments), says nothing."""

    def __init__(self):
        self.asked: list[tuple] = []

    def submit(self, fn, *args) -> Future:
        self.asked.append(args)
        done = Future()
        done.set_result(None)
        return done


def test_a_failure_during_synthesis_cancels_the_speech_still_queued(tmp_path, monkeypatch):
    import threading
    import time

    started, lock = [], threading.Lock()

    def slow_speech(text, *_):
        with lock:
            started.append(text)
        time.sleep(0.5)

    def broken(*_):
        raise RuntimeError("a renderer failed")

    monkeypatch.setattr(world_module, "_speak", slow_speech)
    monkeypatch.setattr(world_module._Builder, "captions", broken)  # right after the spoken questions are queued
    with pytest.raises(RuntimeError, match="a renderer failed"):
        synthesize_world(tmp_path, seed=0, size=SMALL, log=lambda _: None)
    assert len(started) == 2  # the two the workers had begun; the other spoken questions were never said


def test_background_talk_in_test_is_never_heard_in_training(tmp_path):
    recorder = _SpeechRecorder()
    builder = world_module._Builder(tmp_path, seed=0, speaking=recorder, encoding=recorder)  # no clips here
    for split, talks in (("train", world_module.BACKGROUND_TALK), ("test", world_module.BACKGROUND_TALK_TEST)):
        recorder.asked.clear()
        builder.background(split, 12)
        heard = {text for text, _, _, background, _ in recorder.asked if background}
        assert heard and heard <= set(talks)
    assert not set(world_module.BACKGROUND_TALK) & set(world_module.BACKGROUND_TALK_TEST)


def test_videos_cover_all_three_sampling_regimes(world):
    from omniforge.processing.video import load_video

    durations = []
    for line in (world / "train" / "video_qa.jsonl").read_text().splitlines():
        record = json.loads(line)
        durations.append(load_video(world / "train" / record["videos"][0]).duration)
    # 2-4 s (4 frames), 4-16 s (1 fps), 16-20 s (16 frames), chosen uniformly at random per clip
    assert all(1.9 < d < 20.5 for d in durations)


@pytest.mark.parametrize("task", ["video_directions", "video_directions_all_lengths"])
def test_direction_clips_move_the_way_their_answer_says(world, task):
    from omniforge.processing.video import load_video

    lines = (world / "train" / f"{task}.jsonl").read_text().splitlines()
    assert len(lines) == getattr(SMALL, task)
    frame_counts = set()
    for line in lines:
        record = json.loads(line)
        question, answer = (m["content"] for m in record["messages"])
        assert question.startswith("<video>\nWhich way does the ") and answer in ("left", "right", "up", "down")
        video = load_video(world / "train" / record["videos"][0])
        assert 1.9 < video.duration < (4.1 if task == "video_directions" else 20.5)
        frame_counts.add(len(video.frames))

        def centre(frame) -> np.ndarray:  # (x, y) of the pixels far from the background
            pixels = np.asarray(frame.convert("RGB")).astype(int)
            ys, xs = np.nonzero(np.abs(pixels - np.array(scenes.BACKGROUND)).sum(-1) > 120)
            return np.array([xs.mean(), ys.mean()])

        dx, dy = centre(video.frames[-1]) - centre(video.frames[0])
        moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert moved == answer and max(abs(dx), abs(dy)) > 20  # pixels, of 64
    # the drill's clips are short (4 sampled frames); the others as long as video_qa's
    assert (frame_counts == {4}) if task == "video_directions" else (len(frame_counts) > 1)


def test_tasks_that_repeat_other_tasks_sentences_leave_the_tokenizer_as_it_was(world, tmp_path):
    import shutil

    from omniforge.data.synthetic.world import NOT_FOR_THE_TOKENIZER, train_tokenizer

    shutil.copytree(world / "train", tmp_path / "train")
    assert {"spoken_left", "written_left", "video_directions_all_lengths"} <= set(NOT_FOR_THE_TOKENIZER)
    unheard = json.dumps({"messages": [{"role": "user", "content": "zqxv " * 50}]}) + "\n"
    for task in NOT_FOR_THE_TOKENIZER:  # text of their own would give the tokenizer merges of it
        with open(tmp_path / "train" / f"{task}.jsonl", "a") as file:
            file.write(unheard * 20)
    refit = json.loads((train_tokenizer(tmp_path) / "tokenizer.json").read_text())["model"]
    fitted = json.loads((world / "tokenizer" / "tokenizer.json").read_text())["model"]
    assert refit["vocab"] == fitted["vocab"] and refit["merges"] == fitted["merges"]


def test_background_speech_has_no_answer_and_the_background_state(world):
    records = [json.loads(line) for line in (world / "train" / "background.jsonl").read_text().splitlines()]
    assert records and all(r["messages"][-1] == {"role": "assistant", "content": "", "state": "background"}
                           for r in records)
    tests = [json.loads(line) for line in (world / "test" / "background.jsonl").read_text().splitlines()]
    assert {bool(r["messages"][-1]["content"]) for r in tests} == {True, False}  # ignored and real queries


def test_speech_is_real_audio(world):
    import soundfile

    record = json.loads((world / "train" / "asr.jsonl").read_text().splitlines()[0])
    audio, rate = soundfile.read(world / "train" / record["audios"][0])
    assert rate == 16_000 and 0.3 < len(audio) / rate < 8 and np.abs(audio).max() > 0.05


def test_world_tokenizer_loads_through_the_normal_path(world):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")
    ids = tokenizer("what colour is the circle").input_ids
    assert len(ids) <= 6 and tokenizer.decode(ids) == "what colour is the circle"
    # the chat template's role names are one token each, as in a real LLM's vocabulary
    assert all(len(tokenizer(role).input_ids) == 1 for role in ("system", "user", "assistant"))


def test_lookup_records_ask_the_colour_and_shape_of_every_shape_once(world):
    for line in (world / "train" / "image_lookups.jsonl").read_text().splitlines():
        record = json.loads(line)
        turns = [(q["content"].removeprefix("<image>\n"), a["content"])
                 for q, a in zip(record["messages"][::2], record["messages"][1::2])]
        assert record["messages"][0]["content"].startswith("<image>\n") and len(record["images"]) == 1
        colour_of = {q.split()[-1].rstrip("?"): a for q, a in turns if q.startswith("What colour is the ")}
        shape_of = {q.split()[-1].rstrip("?"): a for q, a in turns if q.startswith("What shape is ")}
        assert len(turns) == 2 * len(colour_of) and 2 <= len(colour_of) <= 3  # each question once
        assert shape_of == {colour: shape for shape, colour in colour_of.items()}


def test_size_records_ask_the_size_of_every_shape_of_a_scene_with_big_and_small_ones(world):
    for line in (world / "train" / "image_sizes.jsonl").read_text().splitlines():
        record = json.loads(line)
        questions = [q["content"].removeprefix("<image>\n") for q in record["messages"][::2]]
        answers = [a["content"] for a in record["messages"][1::2]]
        assert record["messages"][0]["content"].startswith("<image>\n") and len(record["images"]) == 1
        assert all(q.startswith("Is the ") and q.endswith(" big or small?") for q in questions)
        assert len(set(questions)) == len(questions) and 2 <= len(questions) <= 3
        assert set(answers) == {"big", "small"}


def test_spoken_lookup_records_ask_every_question_of_a_scene_aloud(world):
    for line in (world / "train" / "spoken_lookups.jsonl").read_text().splitlines():
        record = json.loads(line)
        questions = [q["content"] for q in record["messages"][::2]]
        answers = [a["content"] for a in record["messages"][1::2]]
        assert questions == ["<image><audio>"] + ["<audio>"] * (len(questions) - 1)
        assert len(record["audios"]) == len(questions) and len(record["images"]) == 1
        assert all((world / "train" / path).is_file() for path in record["audios"])
        shapes = [a for a in answers if a in scenes.SHAPES]
        count = [a for a in answers if a in scenes.NUMBERS]
        assert 2 <= len(shapes) <= 3 and count == [scenes.NUMBERS[len(shapes)]]
        assert len(questions) == 3 * len(shapes) + 2  # colour, shape and size of each; the count; on the left
        assert {a for a in answers if a in ("big", "small")} == {"big", "small"}
        assert sum(" " in a for a in answers) == 1  # "<colour> <shape>" is on the left
    written = [json.loads(line) for line in (world / "train" / "written_lookups.jsonl").read_text().splitlines()]
    spoken = [json.loads(line) for line in (world / "train" / "spoken_lookups.jsonl").read_text().splitlines()]
    assert len(written) == len(spoken) == SMALL.spoken_lookups
    for twin, record in zip(written, spoken):  # each spoken record's written twin: the same scene and questions
        assert twin["images"] == record["images"] and "audios" not in twin
        assert twin["messages"][0]["content"].startswith("<image>\n")
        assert [world_module.transcript(q["content"].removeprefix("<image>\n")) for q in twin["messages"][::2]] == [
            a["heard"] for a in record["messages"][1::2]]
        assert [a["content"] for a in twin["messages"][1::2]] == [a["content"] for a in record["messages"][1::2]]


def test_the_drills_left_question_is_also_asked_on_its_own_aloud_and_written(world):
    def read(task):
        return [json.loads(line) for line in (world / "train" / f"{task}.jsonl").read_text().splitlines()]

    drills = list(zip(read("spoken_lookups"), read("written_lookups")))
    alone = list(zip(read("spoken_left"), read("written_left")))
    assert len(alone) == len(drills) == SMALL.spoken_lookups  # every drill scene has two shapes or more
    for (spoken_drill, written_drill), (spoken, written) in zip(drills, alone):
        turn = [q["content"].endswith("What is on the left?") for q in written_drill["messages"][::2]].index(True)
        assert written["messages"] == [{"role": "user", "content": "<image>\nWhat is on the left?"},
                                       written_drill["messages"][2 * turn + 1]]
        assert spoken["messages"] == [{"role": "user", "content": "<image><audio>"}, spoken_drill["messages"][2 * turn + 1]]
        assert spoken["messages"][1]["heard"] == "what is on the left"
        assert spoken["audios"] == [spoken_drill["audios"][turn]]  # the drill's own utterance of it
        assert spoken["images"] == written["images"] == written_drill["images"]


def test_answers_to_spoken_queries_say_what_they_heard(world):
    said = {}  # utterance -> its words, where the ASR task transcribes it
    for split in ("train", "val", "test"):
        for line in (world / split / "asr.jsonl").read_text().splitlines():
            record = json.loads(line)
            said[(split, record["audios"][0])] = record["messages"][-1]["content"]
    checked = 0
    for file in world.glob("*/*.jsonl"):
        for line in file.read_text().splitlines():
            record = json.loads(line)
            audios = iter(record.get("audios", []))
            for question, answer in zip(record["messages"][::2], record["messages"][1::2]):
                heard = [next(audios) for _ in range(question["content"].count("<audio>"))]
                spoken = heard and not question["content"].replace("<image>", "").replace("<audio>", "").strip()
                if not spoken or answer.get("state") == "background":
                    assert "heard" not in answer, (file, record)
                    continue
                assert answer["heard"] == answer["heard"].lower() and not answer["heard"].endswith("?")
                if (file.parent.name, heard[0]) in said:
                    assert answer["heard"] == said[(file.parent.name, heard[0])]
                    checked += 1
    assert checked >= 4
    twins = [json.loads(line) for line in (world / "test" / "spoken_qa_text.jsonl").read_text().splitlines()]
    spoken = [json.loads(line) for line in (world / "test" / "spoken_qa.jsonl").read_text().splitlines()]
    assert [s["messages"][1]["heard"] for s in spoken] == [
        world_module.transcript(t["messages"][0]["content"].split("\n", 1)[1]) for t in twins]


def test_spoken_drill_reuses_the_splits_utterances_of_a_question(tmp_path):
    recorder = _SpeechRecorder()
    builder = world_module._Builder(tmp_path, seed=0, speaking=recorder, encoding=recorder)  # no clips here
    voice = speech.voices("train")[0]
    said = builder.say("train", "what colour is the circle", voice, "asr_00000.flac")
    rng = np.random.default_rng(0)
    assert builder.utterance("train", "What colour is the circle?", rng, "new.flac") == said
    assert builder.utterance("val", "What colour is the circle?", rng, "new.flac") != said  # splits never share
    assert len(recorder.asked) == 2


def test_test_split_is_an_eval_task_set_with_spoken_text_pairs(world):
    tasks = {t.name: t for t in load_tasks(TaskSpec("synth", "synth", world / "test"))}
    spoken, written = tasks["synth/spoken_qa"].items, tasks["synth/spoken_qa_text"].items
    assert all(s.media.get("audio") for s in spoken) and not any(s.media.get("audio") for s in written)
    pairs = [s.extra["pair_id"] for s in spoken]
    assert len(set(pairs)) == len(pairs) == len(spoken) and pairs == [s.extra["pair_id"] for s in written]
    assert [s.reference for s in spoken] == [s.reference for s in written]


def test_big_and_small_are_told_apart_by_pixels_whatever_the_shape_count():
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    areas = {(kind, big): [] for kind in scenes.SHAPES for big in (True, False)}
    for _ in range(80):
        for shape in scenes.scene(rng, "train", int(rng.integers(1, 4))):
            mask = Image.new("L", (64, 64))
            scenes.draw_shape(ImageDraw.Draw(mask), shape, 64, 64, fill=1)
            areas[shape.kind, shape.big].append(int(np.asarray(mask).sum()))
    for kind in scenes.SHAPES:  # the pixels alone answer "is the <kind> big or small?"
        assert min(areas[kind, True]) > 1.5 * max(areas[kind, False]), kind
        assert min(areas[kind, False]) > 60, kind  # and a small shape still spans a few 8-px patches


def test_demo_breakdown_gives_held_out_pairs_a_kind_of_their_own(tmp_path):
    from omniforge.demo import by_question

    asked = [("What shape is yellow?", "circle", True), ("What shape is yellow?", "square", False),  # yellow circle: held out
             ("What colour is the circle?", "red", True), ("What is on the left?", "orange square", False),
             ("How many shapes are there?", "two", True)]
    source, predictions = tmp_path / "image_qa.jsonl", tmp_path / "predictions.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}]})
             for q, a, _ in asked]
    source.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")  # a blank line: the reader skips it
    verdicts = [{"id": f"image_qa.jsonl[{i}]", "correct": right} for i, (*_, right) in enumerate(asked)]
    verdicts.insert(1, {"id": "image_qa.jsonl[9]", "skipped": "its image did not load"})  # no answer: not counted
    predictions.write_text("".join(json.dumps(v) + "\n" for v in verdicts))
    assert by_question(predictions, source) == {
        "How many shapes are there?": {"accuracy": 100.0, "questions": 1},
        "What colour is the <shape>?": {"accuracy": 100.0, "questions": 1},
        "What is on the left? (held-out pair)": {"accuracy": 0.0, "questions": 1},
        "What shape is <colour>?": {"accuracy": 0.0, "questions": 1},
        "What shape is <colour>? (held-out pair)": {"accuracy": 100.0, "questions": 1}}


def test_quick_demo_runs_every_stage_and_reports(tmp_path):
    result = subprocess.run([sys.executable, "-m", "omniforge.cli", "demo", "--quick", "--out", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    stages = [r["stage"] for r in report["stages"]]
    assert stages == ["0_text_warmup", "1a_visual_alignment", "1b_attribute_lookups", "1b_size_lookups",
                      "1b_visual_fine_grained", "1c_high_resolution", "2_audio_alignment", "2b_video_directions",
                      "3_cross_modal"]
    final = report["stages"][-1]["scores"]
    assert {"image_qa", "video_qa", "asr", "translation", "background", "consistency", "text_qa"} <= set(final)
    assert 0 <= final["asr"]["wer"] and 0 <= final["image_qa"]["exact_match"] <= 100
    assert report["pocketsphinx"]["utterances"] > 0 and report["pocketsphinx"]["wer"] is not None
    assert len(report["examples"]) == 2
    kinds = report["by_question"]["image_qa"]  # the final image-QA score, split by kind of question
    assert "What colour is the <shape>?" in kinds or "What shape is <colour>?" in kinds
    scored = tmp_path / "demo" / "eval" / "3_cross_modal" / "predictions" / "synth" / "image_qa.jsonl"
    assert sum(k["questions"] for k in kinds.values()) == len(scored.read_text().splitlines())
    for name in ("report.md", "scores_by_stage.png", "loss.png", "checkpoint/config.yaml"):
        assert (tmp_path / "demo" / name).is_file()
    assert "after stage" in result.stdout and "PocketSphinx" in result.stdout


# --------------------------------------------------------------------------- stand-in encoders


def test_vision_pretraining_labels_match_the_rendered_pixels():
    from omniforge.train.encoders import _SceneSampler, load_encoder_recipe

    spec = load_encoder_recipe().vision
    sampler = _SceneSampler(spec, grid=4, seed=0)
    side, checked = spec.tile_size // 4, 0
    for _ in range(40):
        image, labels = sampler.sample()
        if labels["word"]:
            assert labels["count"] == -100 and set(labels["cell_kind"]) == {-100}
            continue
        pixels = np.asarray(image).reshape(4, side, 4, side, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1, 3)
        for cell, colour in enumerate(labels["cell_colour"]):
            if colour:  # the labelled colour is drawn in that cell
                rgb = scenes.COLOURS[list(scenes.COLOURS)[colour - 1]]
                assert (np.abs(pixels[cell].astype(int) - rgb).sum(-1) == 0).sum() > 0
                checked += 1
        drawn = {(list(scenes.COLOURS)[c - 1], scenes.SHAPES[k - 1])
                 for c, k in zip(labels["cell_colour"], labels["cell_kind"]) if c}
        assert 1 <= len(drawn) == labels["count"] <= 3
        assert not drawn & scenes.HELD_OUT  # pretraining sees only the training combinations
        for name in ("cell_size", "cell_order"):  # a size and a place wherever a shape is
            assert [k > 0 for k in labels["cell_kind"]] == [v > 0 for v in labels[name]]
        columns = {}  # place from the left -> mean column of its cells
        for cell, place in enumerate(labels["cell_order"]):
            columns.setdefault(place, []).append(cell % 4)
        means = [np.mean(columns[p]) for p in sorted(columns) if p]
        assert means == sorted(means) and set(columns) - {0} == set(range(1, len(means) + 1))
    assert checked > 20


def test_video_frame_pretraining_images_put_one_shape_anywhere_on_a_crossing_path():
    from dataclasses import replace

    from omniforge.train.encoders import _SceneSampler, load_encoder_recipe

    spec = replace(load_encoder_recipe().vision, word_fraction=0.0, frame_fraction=1.0)
    rows_seen = set()
    for seed in range(40):
        image, labels = _SceneSampler(spec, grid=4, seed=seed).sample()
        kinds = np.array(labels["cell_kind"]).reshape(4, 4)
        assert labels["count"] == 1 and set(labels["cell_order"]) <= {0, 1} and set(labels["cell_size"]) <= {0, 2}
        rows, columns = np.nonzero(kinds)
        assert len(set(kinds[kinds > 0])) == 1
        assert {1, 2} <= set(rows) or {1, 2} <= set(columns)  # a path runs through the middle
        rows_seen |= set(rows)
    assert rows_seen == {0, 1, 2, 3}  # shapes near the top and the bottom, as clips show them


def test_recoloured_pretraining_scenes_label_shape_but_not_colour():
    from omniforge.train.encoders import _SceneSampler, load_encoder_recipe

    spec = load_encoder_recipe().vision
    sampler = _SceneSampler(spec, grid=4, seed=0, recolour_fraction=1.0)
    named = np.array(list(scenes.COLOURS.values()))
    scenes_seen = 0
    for _ in range(30):
        image, labels = sampler.sample()
        if labels["word"]:
            continue
        scenes_seen += 1
        shape_pixels = np.abs(np.asarray(image).astype(int) - scenes.BACKGROUND).max(-1) > 40
        rgb = np.asarray(image)[shape_pixels].astype(int)
        assert not (np.abs(rgb[:, None] - named[None]).sum(-1) == 0).any()  # none of the world's colours
        assert set(labels["cell_colour"]) == {-100}
        assert any(k > 0 for k in labels["cell_kind"]) and 1 <= labels["count"] <= 3
    assert scenes_seen > 15


def test_encoder_pretraining_needs_a_world(tmp_path):
    from omniforge.train.encoders import pretrain_encoders

    with pytest.raises(ConfigError, match="omniforge synth"):
        pretrain_encoders(tmp_path)


def test_ctc_best_path_merges_repeats_and_drops_blanks():
    import torch

    from omniforge.train.encoders import _ctc_greedy

    best = [3, 3, 0, 0, 3, 1, 1, 0]  # blank = 0
    log_probs = torch.nn.functional.one_hot(torch.tensor(best), 4).float().log()
    assert _ctc_greedy(log_probs, blank=0) == [3, 3, 1]


def test_speed_perturbed_utterances_play_faster_and_slower_with_the_same_transcript(world):
    import torch
    from transformers import AutoTokenizer
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from omniforge.config import from_dict
    from omniforge.model.audio import AudioEncoder
    from omniforge.model.loading import hf_config
    from omniforge.train.encoders import load_encoder_recipe, transcribed_utterances

    spec = load_encoder_recipe().audio
    audio = AudioEncoder(WhisperEncoder(hf_config(None, spec.arch, "audio")), trim_seconds=spec.trim_seconds)
    tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")
    file = world / "train" / "asr.jsonl"
    as_recorded = transcribed_utterances(file, audio, tokenizer, log=lambda _: None)
    played = transcribed_utterances(file, audio, tokenizer, log=lambda _: None, speeds=[0.8, 1.0, 1.25])
    assert len(played) == 3 * len(as_recorded) > 0  # short utterances: none outgrows its window slowed down
    for i, utterance in enumerate(as_recorded):
        slow, same, fast = played[3 * i:3 * i + 3]
        assert slow.ids == same.ids == fast.ids == utterance.ids
        assert torch.equal(same.features, utterance.features)
        frames = utterance.valid_frames
        assert abs(slow.valid_frames - frames / 0.8) <= 2 and abs(fast.valid_frames - frames / 1.25) <= 2
    with pytest.raises(ConfigError, match="audio.speeds"):
        from_dict(type(spec), {"arch": spec.arch, "speeds": []}, "audio")


def test_stand_in_encoders_are_the_same_side_by_side_or_one_after_the_other(world, tmp_path):
    import torch
    from safetensors.torch import load_file

    from omniforge.train.encoders import load_encoder_recipe, pretrain_encoders

    recipe = load_encoder_recipe()
    recipe.vision.steps, recipe.audio.steps = 6, 2
    runs, threads = {}, torch.get_num_threads()
    for side_by_side in (True, False):
        copy = tmp_path / str(side_by_side)  # the world's inputs, its own encoders/ folder
        copy.mkdir()
        for part in ("tokenizer", "train", "val"):
            (copy / part).symlink_to(world / part)
        torch.set_num_threads(max(1, threads // 2))  # as each of the two processes runs: the same sums
        try:
            scores = pretrain_encoders(copy, recipe, log=lambda _: None, side_by_side=side_by_side,
                                       side_jobs={"side": (pow, (3, 4))})
        finally:
            torch.set_num_threads(threads)
        weights = {part: load_file(copy / "encoders" / part / "model.safetensors") for part in ("vision", "audio")}
        runs[side_by_side] = scores, weights
    (scores, weights), (alone_scores, alone_weights) = runs[True], runs[False]
    assert scores == alone_scores
    assert scores.keys() == {"vision", "audio", "side"} and scores["side"] == 81  # a side job's result, by its name
    for part in ("vision", "audio"):
        assert weights[part].keys() == alone_weights[part].keys()
        assert all(torch.equal(weights[part][k], alone_weights[part][k]) for k in weights[part])


def test_stand_in_encoders_learn_and_load_through_the_micro_recipe(world):
    import torch
    from safetensors.torch import load_file

    from omniforge.model.omni import OmniModel
    from omniforge.train.encoders import load_encoder_recipe, pretrain_encoders
    from omniforge.train.recipe import load_recipe

    recipe = load_encoder_recipe()
    recipe.vision.steps, recipe.audio.steps = 80, 4
    scores = pretrain_encoders(world, recipe, log=lambda _: None)
    assert scores["vision"]["count"] > 60  # chance: 33 %; the count is the first thing a tower learns
    assert 0 <= scores["audio"]["ctc_wer"]
    micro = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml", [f"data_dir={world}"])
    assert micro.model.vision.path == str(world / "encoders" / "vision")
    model = OmniModel.from_config(micro.model)
    stored = load_file(world / "encoders" / "vision" / "model.safetensors")
    name, tensor = next(iter(stored.items()))
    assert torch.equal(model.vision.tower.state_dict()[name], tensor)
    assert (world / "encoders" / "vision" / "preprocessor_config.json").is_file()
    assert (world / "encoders" / "audio" / "config.json").is_file()
    assert model.audio.ctc_weight is not None  # the micro model reads the stand-in's CTC head
    assert model.audio.trim_frames is not None  # and encodes windows as the stand-in was pretrained
    whole = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml",
                        [f"data_dir={world}", "model.audio.trim_seconds=null"])
    with pytest.raises(ConfigError, match="pretrained on windows trimmed to 0.5 s"):
        OmniModel.from_config(whole.model)
