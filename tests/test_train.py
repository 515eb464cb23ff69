"""The training engine: recipes, trainability, packing, the loop, checkpoints, resume, DDP."""

import ctypes.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from omniforge.config import load_config
from omniforge.data.dataset import JsonlConversations, Mixture, SampleCache, SampleStream, encoded_bytes, open_mixture
from omniforge.data.packing import PackedBatches, PaddedBatches, Prefetch, SampleTooLongError
from omniforge.data.synthetic.toy import write_toy_dataset
from omniforge.errors import ConfigError, DataError
from omniforge.files import atomic_folder
from omniforge.model.generate import Completion
from omniforge.model.omni import OmniModel
from omniforge.processing.chat import OmniProcessor
from omniforge.train.components import component_of, configure_stage, merge_lora, param_groups
from omniforge.train.distributed import Distributed
from omniforge.train.evaluate import Evaluator
from omniforge.train.recipe import DatasetSpec, EvalSpec, LoraSpec, StageConfig, load_recipe

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = str(REPO / "recipes" / "models" / "tiny.yaml")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = OmniModel.from_config(load_config(TINY_MODEL))
    return model, OmniProcessor.from_model(model)


def write_recipe(folder: Path, data: Path, stages: list[dict], **train) -> Path:
    recipe = {"model": TINY_MODEL, "train": {"out_dir": str(folder / "run"), "seed": 0, **train},
              "stages": [{"data": [{"path": str(data)}], **s} for s in stages]}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "omniforge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.skipif(ctypes.util.find_library("tcmalloc_minimal") is None, reason="no tcmalloc on this system")
def test_the_command_starts_again_under_tcmalloc_unless_told_not_to():
    probe = ("import omniforge.cli as cli; cli.rerun_under_tcmalloc(); "
             "print('tcmalloc' in open('/proc/self/maps').read())")
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OMNIFORGE_TCMALLOC")}
    loaded = [subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                             env={**clean, **extra}).stdout.split() for extra in ({}, {"OMNIFORGE_TCMALLOC": "0"})]
    assert loaded == [["True"], ["False"]]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_validates(path):
    if path.name == "micro_encoders.yaml":  # the demo's encoder pretraining, not a staged recipe
        from omniforge.train.encoders import load_encoder_recipe

        encoders = load_encoder_recipe(path)
        assert encoders.vision.steps > 0 and encoders.audio.arch["model_type"] == "whisper"
        return
    recipe = load_recipe(path)
    assert recipe.stages and all(s.data for s in recipe.stages)


def test_shipped_7b_recipe_follows_the_papers_phases():
    recipe = load_recipe(REPO / "recipes" / "capybara_7b.yaml")
    stages = {s.name: s for s in recipe.stages}
    assert stages["1a_visual_alignment"].components == {"vision_adapter": "full"}
    audio = stages["2_audio_alignment"]
    assert audio.mode("llm") == "frozen" and audio.mode("vision_tower") == "frozen" and audio.mode("audio_tower") == "full"
    assert recipe.model.vision.max_tiles == 9 and recipe.model.llm.path.endswith("Qwen2.5-7B-Instruct")


@pytest.mark.parametrize("override, message", [
    (["stages.0.components.vision=full"], "stages[0].components.vision: unknown component"),
    (["stages.0.epochs=1"], "set exactly one of `steps` or `epochs`"),
    (["stages.0.batch_size=4"], "set exactly one of `batch_tokens`"),
    (["stages.0.lr.audio=0.1"], "stages[0].lr.audio: unknown component"),
    (["stages.0.components.vision_adapter=lora"], "LoRA applies to towers and the LLM"),
    (["train.precision=fp8"], "train.precision: expected one of"),
    (["model.vision.pool=0"], "vision.pool: must be >= 1"),
    (["stages.0.warmup_steps=3"], "stages[0].warmup_steps: must be <= steps (2), got 3"),
    (["train.lora.r=0"], "train.lora.r: must be >= 1"),
    (["train.lora.alpha=0"], "train.lora.alpha: must be > 0"),
    (["train.lora.dropout=1"], "train.lora.dropout: must be within [0, 1)"),
    (["train.weight_decay=-0.1"], "train.weight_decay: must be >= 0"),
    (["train.max_grad_norm=-1"], "train.max_grad_norm: must be >= 0"),
    (["stages.0.beside=b"], "stages.a.beside: must name the stage just before it (none), got 'b'"),
    (["stages.1.beside=c"], "stages.b.beside: must name the stage just before it (a), got 'c'"),
    (["stages.1.beside=a", "stages.1.components.llm=lora"], "stages.b.beside: both stages train llm"),
])
def test_recipe_errors_name_the_key(tmp_path, dataset, override, message):
    path = write_recipe(tmp_path, dataset, [{"name": "a", "steps": 2, "batch_tokens": 512, "components": {"llm": "full"}},
                                            {"name": "b", "steps": 2, "batch_tokens": 512}])
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe(path, override)


def test_recipe_errors_in_a_model_file_name_that_file(tmp_path, dataset):
    model = yaml.safe_load(Path(TINY_MODEL).read_text())
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({**model, "vision": {**model["vision"], "pool": 0}}))
    path = write_recipe(tmp_path, dataset, [{"name": "a", "steps": 2, "batch_tokens": 512}])
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "model": "model.yaml"}))
    with pytest.raises(ConfigError, match=r"recipe.yaml \(its model: .*model.yaml\): model.vision.pool"):
        load_recipe(path)


def test_recipe_overrides_reach_stages_and_model(tmp_path, dataset):
    path = write_recipe(tmp_path, dataset, [{"name": "a", "steps": 2, "batch_tokens": 512}])
    recipe = load_recipe(path, ["stages.0.steps=7", "model.vision.max_tiles=2", "train.seed=3"])
    assert recipe.stages[0].steps == 7 and recipe.model.vision.max_tiles == 2 and recipe.train.seed == 3


def test_a_data_dir_override_is_relative_to_the_working_directory(tmp_path, dataset, monkeypatch):
    path = write_recipe(tmp_path / "recipes", dataset, [{"name": "a", "steps": 2, "batch_tokens": 512}])
    path.write_text(path.read_text().replace(str(dataset), dataset.name))
    monkeypatch.chdir(dataset.parent.parent)
    recipe = load_recipe(path, [f"data_dir={dataset.parent.name}"])
    assert recipe.stages[0].data[0].path == str(dataset.absolute())


def test_data_paths_are_absolute_however_the_recipe_path_is_spelled(tmp_path, dataset, monkeypatch):
    path = write_recipe(tmp_path / "recipes", dataset, [{"name": "a", "steps": 2, "batch_tokens": 512}])
    path.write_text(path.read_text().replace(str(dataset), "data.jsonl"))
    monkeypatch.chdir(tmp_path)
    assert load_recipe(Path("recipes/recipe.yaml")).stages[0].data[0].path == str(tmp_path / "recipes" / "data.jsonl")


def test_stages_read_a_file_they_share_each_in_an_order_of_its_own(tmp_path, dataset):
    recipe = load_recipe(write_recipe(tmp_path, dataset, STAGES))  # the same file, first in both stages
    records = len(JsonlConversations(dataset))
    orders = [list(islice(open_mixture(s.data, recipe.stage_seed(s)).order(), records)) for s in recipe.stages]
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])  # one epoch each, shuffled apart
    alone = load_recipe(write_recipe(tmp_path / "alone", dataset, STAGES[1:]))
    assert alone.stage_seed(alone.stages[0]) == recipe.stage_seed(recipe.stages[1])  # by name, not place


# --------------------------------------------------------------------------- trainability

def test_components_are_resolved_by_module_path_not_substring():
    assert component_of("vision_adapter.0.weight") == "vision_adapter"
    assert component_of("vision.tower.encoder.layers.0.mlp.fc1.weight") == "vision_tower"
    assert component_of("audio.encoder.conv1.weight") == "audio_tower"
    assert component_of("llm.model.layers.0.self_attn.q_proj.weight") == "llm"


def test_stage_freezes_exactly_the_components_it_does_not_name(dataset):
    torch.manual_seed(0)
    model = OmniModel.from_config(load_config(TINY_MODEL))
    stage = StageConfig(name="s", data=[DatasetSpec(str(dataset))], steps=1, batch_size=1,
                        components={"vision_adapter": "full", "audio_tower": "full"}, lr={"default": 1e-3, "audio_tower": 1e-4})
    rows = {r.component: r for r in configure_stage(model, stage, LoraSpec())}
    assert rows["vision_adapter"].trainable == rows["vision_adapter"].params > 0
    assert rows["llm"].trainable == 0 and rows["vision_tower"].trainable == 0
    for name, p in model.named_parameters():
        assert p.requires_grad == (component_of(name) in ("vision_adapter", "audio_tower"))
    groups = param_groups(model, stage, weight_decay=0.1)
    assert {g["component"]: g["lr"] for g in groups} == {"vision_adapter": 1e-3, "audio_tower": 1e-4}
    assert all(g["weight_decay"] == 0 for g in groups if all(p.ndim == 1 for p in g["params"]))


def test_files_of_one_name_are_told_apart_by_their_folders(tmp_path, dataset):
    for language in ("en", "zh"):
        (tmp_path / language).mkdir()
        shutil.copy(dataset, tmp_path / language / "train.jsonl")
    mixture = open_mixture([DatasetSpec(str(tmp_path / language / "train.jsonl")) for language in ("en", "zh")], 0)
    assert [d.name for d in mixture.datasets] == ["en/train.jsonl", "zh/train.jsonl"]  # in skip counts and warnings
    assert mixture.datasets[1].where(3) == "zh/train.jsonl[3]"


def test_a_stage_that_would_train_nothing_it_names_is_an_error(dataset):
    frozen = StageConfig(name="s", data=[DatasetSpec(str(dataset))], steps=1, batch_size=1)
    with pytest.raises(ConfigError, match="stages.s.components: nothing to train"):
        configure_stage(OmniModel.from_config(load_config(TINY_MODEL)), frozen, LoraSpec())
    config = load_config(TINY_MODEL)
    config.audio = None
    deaf = OmniModel.from_config(config)
    audio = StageConfig(name="s", data=[DatasetSpec(str(dataset))], steps=1, batch_size=1,
                        components={"vision_adapter": "full", "audio_adapter": "full"})
    with pytest.raises(ConfigError, match="stages.s.components.audio_adapter: full, but the model has no audio_adapter"):
        configure_stage(deaf, audio, LoraSpec())


def test_lora_trains_adapters_only_and_merges_into_the_weights(tiny, dataset):
    model, processor = tiny
    model = OmniModel.from_config(load_config(TINY_MODEL))
    stage = StageConfig(name="s", data=[DatasetSpec(str(dataset))], steps=1, batch_size=1, components={"llm": "lora"})
    rows = {r.component: r for r in configure_stage(model, stage, LoraSpec(r=4))}
    assert 0 < rows["llm"].trainable < rows["llm"].params / 2
    assert all(("lora_" in n) == p.requires_grad for n, p in model.llm.named_parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a trained adapter
    batch = processor.collate([processor.encode([{"role": "user", "content": "hello"}])])
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        assert merge_lora(model) > 0
        after = model(**batch).logits
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(before, after, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- data

def test_learning_rate_warms_up_linearly_then_decays_to_the_floor():
    from omniforge.train.loop import warmup_cosine

    factor = warmup_cosine(warmup=4, steps=20, floor=0.1)
    assert [factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0 and factor(12) == pytest.approx(0.55) and factor(20) == pytest.approx(0.1)
    assert all(factor(i) >= factor(i + 1) for i in range(4, 30))  # never rises again, stays at the floor


@pytest.mark.parametrize("device, cores, threads, expected", [
    ("cpu", 2, 2, False),  # every core is in the step: a prefetch thread would only take them away
    ("cpu", 8, 4, True),
    ("cuda", 2, 2, True),  # the CPU waits on the accelerator anyway
])
def test_batches_are_prefetched_only_where_cores_are_spare(monkeypatch, device, cores, threads, expected):
    from omniforge.train import loop

    monkeypatch.setattr(loop.os, "sched_getaffinity", lambda _: set(range(cores)), raising=False)
    monkeypatch.setattr(loop.torch, "get_num_threads", lambda: threads)
    assert loop._prefetch_pays(torch.device(device)) is expected


def test_prefetch_thread_stops_when_closed():
    batches = Prefetch(iter(range(100)), depth=2)
    assert [next(batches), next(batches)] == [0, 1]
    batches.close()  # the thread was blocked on a full queue
    assert not batches._thread.is_alive()


def test_atomic_folder_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("crash mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (target / "old.txt").is_file()
    with atomic_folder(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and [p.name for p in target.iterdir()] == ["new.txt"]


@pytest.mark.parametrize("dangling", [False, True])
def test_atomic_folder_replaces_a_link_and_leaves_what_it_pointed_to(tmp_path, dangling):
    elsewhere = tmp_path / "elsewhere"
    if not dangling:
        elsewhere.mkdir()
        (elsewhere / "kept.txt").write_text("kept")
    (tmp_path / "export").symlink_to(elsewhere, target_is_directory=True)
    with atomic_folder(tmp_path / "export") as tmp:
        (tmp / "new.txt").write_text("new")
    export = tmp_path / "export"
    assert not export.is_symlink() and [p.name for p in export.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if dangling else ["elsewhere"]) + ["export"]
    assert dangling or (elsewhere / "kept.txt").read_text() == "kept"


def test_mixture_is_deterministic_weighted_and_resumable(dataset, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"messages": [{"role": "user", "content": str(i)}]}) + "\n" for i in range(5)))
    mixture = Mixture([JsonlConversations(dataset), JsonlConversations(other)], [3.0, 1.0], seed=0)
    first = [x for _, x in zip(range(400), mixture.order())]
    assert first == [x for _, x in zip(range(400), Mixture(mixture.datasets, [3.0, 1.0], seed=0).order())]
    assert 0.65 < sum(d == 0 for d, _ in first) / 400 < 0.85
    assert [x for _, x in zip(range(100), mixture.order(300))] == first[300:400]
    epoch = [i for d, i in first if d == 1][:5]
    assert sorted(epoch) == list(range(5))  # every record once per epoch, shuffled


def test_corrupt_samples_are_skipped_and_counted(tiny, dataset, tmp_path):
    _, processor = tiny
    bad = dataset.parent / "bad.jsonl"  # beside the media the good records name
    good = dataset.read_text().splitlines()[:4]
    not_utf8 = b'{"messages": "\xff\xfe"}'
    bad.write_bytes(b"\n".join([good[0].encode(), b"{not json", not_utf8, json.dumps(
        {"messages": [{"role": "user", "content": "<image>"}], "images": ["missing.png"]}).encode(),
        good[2].encode()]) + b"\n")
    stream = SampleStream(Mixture([JsonlConversations(bad)], [1.0], seed=0), processor, warn=lambda _: None)
    samples = [s for _, s in zip(range(8), stream)]
    assert len(samples) == 8  # 2 good records an epoch: 4 epochs, each with 3 bad lines (2 unparseable)
    assert set(stream.skipped) == {"bad.jsonl: ConversationError", "bad.jsonl: UnreadableMediaError"}
    assert 6 <= stream.skipped["bad.jsonl: ConversationError"] <= 8
    assert 3 <= stream.skipped["bad.jsonl: UnreadableMediaError"] <= 4


def same_sample(a, b) -> bool:
    return (a.input_ids == b.input_ids and a.labels == b.labels and len(a.media) == len(b.media)
            and all(torch.equal(x.pixel_values, y.pixel_values) if x.pixel_values is not None
                    else torch.equal(x.audio_features, y.audio_features) for x, y in zip(a.media, b.media)))


def test_the_sample_cache_serves_the_same_samples_within_its_budget(tiny, dataset):
    _, processor = tiny
    records = len(dataset.read_text().splitlines())
    mixture = Mixture([JsonlConversations(dataset)], [1.0], seed=0)
    plain = [p.sample for _, p in zip(range(3 * records), SampleStream(mixture, processor, warn=lambda _: None))]
    cache = SampleCache(2**30)
    cached = [p.sample for _, p in zip(range(3 * records), SampleStream(mixture, processor, cache=cache))]
    assert all(same_sample(a, b) for a, b in zip(plain, cached))
    assert (cache.misses, cache.hits, len(cache)) == (records, 2 * records, records)  # each record encoded once
    assert any(s.media for s in plain) and cache.bytes == sum(encoded_bytes(s) for s in plain[:records])
    assert "2" in cache.summary() and "67 %" in cache.summary()

    small = SampleCache(max(encoded_bytes(s) for s in plain[:records]) * 2)  # holds two samples at most
    stream = SampleStream(mixture, processor, cache=small)
    again = [p.sample for _, p in zip(range(2 * records), stream)]
    assert all(same_sample(a, b) for a, b in zip(plain, again))
    assert 1 <= len(small) <= 2 and small.bytes <= small.max_bytes
    last = [(str(dataset), i) for d, i in islice(mixture.order(0), 2 * records)][-len(small):]
    assert all(small.get(key) is not None for key in last)  # the most recently read are the ones kept


def test_a_run_reads_the_same_batches_with_the_sample_cache(tmp_path, dataset, capsys):
    from omniforge.train.loop import train

    losses = {}
    for gigabytes in (0, 1):
        path = write_recipe(tmp_path / str(gigabytes), dataset, STAGES, sample_cache_gb=gigabytes)
        train(load_recipe(path))
        losses[gigabytes] = [r["loss"] for r in metrics(tmp_path / str(gigabytes) / "run") if "loss" in r]
    assert len(losses[0]) == 12 and losses[0] == losses[1]
    served = re.search(r"stage all done .*sample cache: (\d+)/(\d+) reads served", capsys.readouterr().out)
    assert int(served[1]) > 0  # the second stage reads the file the first one read


def test_a_record_that_crashes_processing_is_skipped_naming_its_file(tiny, dataset, tmp_path, monkeypatch):
    _, processor = tiny
    odd = dataset.parent / "odd.jsonl"  # beside the media the good records name
    good = dataset.read_text().splitlines()[:2]
    odd.write_text("\n".join([good[0], json.dumps({"messages": [{"role": "user", "content": "hi"}], "system": 5}),
                              good[1]]) + "\n")
    encode = processor.encode_record

    def encode_as_unhardened_code_does(record, base_dir=None, where="sample"):
        if not isinstance(record.get("system", ""), str):
            return "" + record["system"]  # TypeError, which names no file
        return encode(record, base_dir, where)

    monkeypatch.setattr(processor, "encode_record", encode_as_unhardened_code_does)
    said = []
    stream = SampleStream(Mixture([JsonlConversations(odd)], [1.0], seed=0), processor, warn=said.append)
    assert len([s for _, s in zip(range(4), stream)]) == 4  # the two good records, twice
    assert stream.skipped == {"odd.jsonl: TypeError": 2}
    assert said[0].startswith("skipped odd.jsonl[1]: TypeError: can only concatenate str")


def test_training_evals_skip_and_report_bad_records(tiny, dataset):
    _, processor = tiny
    evals = dataset.parent / "evals.jsonl"  # beside the media the good records name
    good = dataset.read_text().splitlines()[:2]
    missing = json.dumps({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
                          "images": ["missing.png"]})
    evals.write_text("\n".join([good[0], "{not json", missing, good[1]]) + "\n")
    said = []
    evaluator = Evaluator([EvalSpec("probe", str(evals), limit=8)], processor, warn=said.append)
    spec, prompts, answers, _, _ = evaluator.sets[0]
    assert len(prompts) == 2 and answers == [json.loads(line)["messages"][-1]["content"] for line in good]
    assert said and said[0].startswith("eval probe: 2 record(s) of") and "evals.jsonl" in said[0]
    evals.write_text("{not json\n")
    with pytest.raises(DataError, match="eval probe: no usable record"):
        Evaluator([EvalSpec("probe", str(evals))], processor, warn=said.append)


def test_training_evals_score_greedy_answers_by_their_metric(tiny, dataset, monkeypatch):
    import omniforge.train.evaluate as evaluate
    from omniforge.eval.metrics import bleu_chrf

    model, processor = tiny
    specs = [EvalSpec(metric, str(dataset), metric=metric, limit=4) for metric in ("exact_match", "wer", "bleu")]
    evaluator = Evaluator(specs, processor)
    answers = evaluator.sets[0][2]

    answered = ["wrong"] + answers[1:]  # the first of four answers replaced

    def greedy(model, processor, prompts, config):  # stands in for greedy decoding
        assert len(prompts) == len(answers)
        return [Completion(text, [], "stop") for text in answered]

    monkeypatch.setattr(evaluate, "generate_completions", greedy)
    scores = evaluator.run(model)
    words = [len(a.split()) for a in answers]
    assert scores["exact_match"] == pytest.approx(75.0)  # a percentage, as `omniforge eval` reports it
    assert scores["wer"] == pytest.approx(100 * words[0] / sum(words))  # "wrong" for k words: k edits
    assert scores["bleu"] == pytest.approx(bleu_chrf(answered, answers)["bleu"])


def test_data_where_every_sample_fails_raises_instead_of_looping(tiny, dataset, tmp_path):
    _, processor = tiny
    bad = tmp_path / "all_bad.jsonl"
    bad.write_text("{not json\n" * 3)
    stream = SampleStream(Mixture([JsonlConversations(bad)], [1.0], seed=0), processor, warn=lambda _: None)
    with pytest.raises(DataError, match=r"all_bad.jsonl: its last 50 samples read all failed to load .*"
                                        r"'all_bad.jsonl: ConversationError': 50.*all_bad.jsonl\[\d\]: invalid JSON"):
        next(stream)
    moved = dataset.parent / "moved.jsonl"  # most of the mixture, its media folder gone
    moved.write_text(json.dumps({"messages": [{"role": "user", "content": "<image>"}], "images": ["gone.png"]}) + "\n")
    mixture = Mixture([JsonlConversations(moved), JsonlConversations(dataset)], [3.0, 1.0], seed=0)
    stream = SampleStream(mixture, processor, warn=lambda _: None)
    with pytest.raises(DataError, match="moved.jsonl: its last 50 samples read all failed to load"):
        for _ in islice(stream, 1000):  # the other dataset's samples load all along
            pass
    mixture = open_mixture([DatasetSpec(str(dataset))], seed=0)
    with pytest.raises(SampleTooLongError, match="samples were all too long"):
        next(PackedBatches(SampleStream(mixture, processor), processor, budget=50, skip_long=True))


def test_packed_rows_keep_samples_separate_and_resume_exactly(tiny, dataset):
    model, processor = tiny
    model.eval()
    mixture = open_mixture([DatasetSpec(str(dataset))], seed=0)
    batches = PackedBatches(SampleStream(mixture, processor), processor, budget=1024)
    batch = next(batches)
    assert batch.inputs["input_ids"].shape == (1, 1024) and batch.samples >= 3
    assert batch.padding_waste == pytest.approx(1 - batch.tokens / 1024)
    positions = batch.inputs["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert len(starts) == batch.samples + (batch.tokens < 1024)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.inputs.items() if k != "labels"}).logits[0]
        stream = SampleStream(mixture, processor)
        for start in starts[:batch.samples]:
            sample = next(stream).sample
            alone = processor.collate([sample])
            alone.pop("labels")
            torch.testing.assert_close(packed[start:start + len(sample)], model(**alone).logits[0], atol=1e-4, rtol=1e-4)
    follow = next(batches)
    resumed = next(PackedBatches(SampleStream(mixture, processor, start=batch.resume_at), processor, budget=1024))
    assert torch.equal(follow.inputs["input_ids"], resumed.inputs["input_ids"])


def test_samples_longer_than_the_budget_fail_or_are_skipped(tiny, dataset):
    _, processor = tiny
    mixture = open_mixture([DatasetSpec(str(dataset))], seed=0)
    with pytest.raises(SampleTooLongError, match="more than the packing budget of 100"):
        next(PackedBatches(SampleStream(mixture, processor), processor, budget=100))
    stream = SampleStream(mixture, processor)
    batches = PackedBatches(stream, processor, budget=200, skip_long=True)  # samples: 74 to 209 tokens
    assert all(next(batches).tokens <= 200 for _ in range(6))
    assert stream.skipped[f"{dataset.name}: SampleTooLong"] > 0


def test_padded_batches(tiny, dataset):
    _, processor = tiny
    batch = next(PaddedBatches(SampleStream(open_mixture([DatasetSpec(str(dataset))], 0), processor), processor, 4))
    assert batch.samples == 4 and batch.inputs["attention_mask"].sum() == batch.tokens


# --------------------------------------------------------------------------- the loop

STAGES = [
    {"name": "align", "components": {"vision_adapter": "full", "audio_adapter": "full"}, "lr": {"default": 3e-3},
     "steps": 6, "batch_tokens": 1024},
    {"name": "all", "components": {"vision_tower": "full", "vision_adapter": "full", "audio_adapter": "full",
                                   "llm": "lora"},
     "lr": {"default": 3e-3}, "steps": 6, "batch_size": 4, "grad_accum": 2, "eval_every": 3},
]


def test_train_runs_stages_freezes_logs_and_exports(tmp_path, dataset):
    recipe = write_recipe(tmp_path, dataset, STAGES)
    data = yaml.safe_load(recipe.read_text())
    data["evals"] = [{"name": "qa", "path": str(dataset), "limit": 8}, {"name": "qa_loss", "path": str(dataset),
                                                                         "limit": 8, "metric": "loss"}]
    recipe.write_text(yaml.safe_dump(data))
    result = run_cli("train", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert "vision_adapter  full" in result.stdout and "llm             frozen" in result.stdout
    records = metrics(run)
    steps = [r for r in records if "loss" in r]
    assert [(r["stage"], r["step"]) for r in steps] == [("align", i) for i in range(1, 7)] + [("all", i) for i in range(1, 7)]
    assert all(0 <= r["padding_waste"] < 1 and r["tokens"] > 0 for r in steps)
    evals = [r for r in records if "eval" in r]
    assert [(r["stage"], r["step"]) for r in evals] == [("align", 6), ("all", 3), ("all", 6)]
    assert (run / "loss.png").stat().st_size > 1000
    stage_record = json.loads((run / "stages" / "align" / "stage.json").read_text())
    assert {c["component"]: c["mode"] for c in stage_record["components"]}["llm"] == "frozen"
    torch.manual_seed(0)
    initial = OmniModel.from_config(load_config(TINY_MODEL))
    aligned = OmniModel.from_pretrained(run / "stages" / "align")
    changed = {name: not torch.equal(p, initial.state_dict()[name]) for name, p in aligned.state_dict().items()}
    assert all(changed[n] for n in changed if n.startswith(("vision_adapter.", "audio_adapter.")))
    assert not any(changed[n] for n in changed if n.startswith(("llm.", "vision.", "audio.")))
    final = OmniModel.from_pretrained(run / "stages" / "all")
    assert not any("lora_" in n for n in final.state_dict())  # merged into the exported weights
    assert not torch.equal(final.llm.model.layers[0].self_attn.q_proj.weight,
                           aligned.llm.model.layers[0].self_attn.q_proj.weight)
    assert "warning" not in result.stdout
    # a mid-recipe stage starts from the previous export: a model override cannot apply, and says so
    again = run_cli("train", recipe, "model.vision.pool=1", "train.checkpoint_every=0", "--stage", "all")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the recipe's model sets vision.pool differently" in again.stdout


def test_dry_run_prints_tables_and_budgets(tmp_path, dataset):
    result = run_cli("train", write_recipe(tmp_path, dataset, STAGES), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "== stage align" in result.stdout and "6 steps, 1,024 tokens a step (packed)" in result.stdout
    assert "token budget: 6,144 tokens" in result.stdout and not (tmp_path / "run").exists()
    by_epochs = run_cli("train", write_recipe(tmp_path / "epochs", dataset, [dict(STAGES[1], steps=None, epochs=2)]),
                        "--dry-run")
    records = len(dataset.read_text().splitlines())
    steps = -(-2 * records // (4 * 2))  # 2 passes, 4 samples a micro-batch, 2 micro-batches a step
    assert f"2 epochs = {steps} steps, 8 samples a step (padded)" in by_epochs.stdout, by_epochs.stdout
    assert "token budget:" in by_epochs.stdout.split("== stage all")[1]
    no_data = run_cli("train", write_recipe(tmp_path / "nodata", tmp_path / "gone.jsonl", STAGES), "--dry-run")
    assert no_data.returncode == 2 and "error: 1 data file(s) missing" in no_data.stderr  # named once, for two stages
    assert "gone.jsonl: MISSING" in no_data.stdout and "6 steps, 1,024 tokens a step" in no_data.stdout  # the plan still


def test_dry_run_counts_a_stage_after_a_lora_stage_on_merged_weights(tmp_path, dataset):
    from omniforge.train.plan import dry_run

    full = {"name": "full", "components": {"llm": "full"}, "steps": 2, "batch_size": 2}
    report, missing = dry_run(load_recipe(write_recipe(tmp_path, dataset, [STAGES[1], full])))
    assert not missing
    rows = [line.replace(",", "").split()[1:4] for line in report.splitlines() if line.split()[:1] == ["llm"]]
    assert [mode for mode, *_ in rows] == ["lora", "full"]  # llm MODE PARAMS TRAINABLE, a row a stage
    (lora_params, lora_trainable), (params, trainable) = [map(int, counts) for _, *counts in rows]
    assert 0 < lora_trainable < lora_params
    assert params == trainable == lora_params  # the adapters merged into the weights, not counted again


def test_a_missing_file_or_a_stage_with_nothing_to_train_fails_before_any_stage_trains(tmp_path, dataset):
    from omniforge.train.loop import train

    path = write_recipe(tmp_path, dataset, STAGES)
    recipe = load_recipe(path, [f"stages.1.data.0.path={tmp_path / 'gone.jsonl'}"])
    with pytest.raises(ConfigError, match=r"1 data file\(s\) missing: .*gone.jsonl"):
        train(recipe)
    frozen = load_recipe(path, [f"stages.1.components.{part}=frozen" for part in STAGES[1]["components"]])
    with pytest.raises(ConfigError, match="stages.all.components: nothing to train"):
        train(frozen)  # found before stage align trains, not after it
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_stage_starts_from_its_own_rng_state_whatever_ran_before(tmp_path, dataset, tiny, monkeypatch):
    from omniforge.train import loop

    model, processor = tiny
    recipe = load_recipe(write_recipe(tmp_path, dataset, STAGES))
    draws = []

    class Started(Exception):
        pass

    def draw_then_stop(*_):  # what LoRA initialisation would draw
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
        raise Started

    monkeypatch.setattr(loop, "configure_stage", draw_then_stop)
    for earlier in (1, 2):  # the RNG states the stages before (or none) may leave
        random.seed(earlier)
        np.random.seed(earlier)
        torch.manual_seed(earlier)
        with pytest.raises(Started):
            loop.run_stage(recipe, recipe.stages[1], model, processor, None, Distributed(), loop._Log(tmp_path, False), None)
    assert draws[0] == draws[1]


def split_by_media(dataset: Path) -> dict[str, Path]:
    """The toy records that hold audio, and those that hold none, each in a file beside `dataset`."""
    records = [json.loads(line) for line in dataset.read_text().splitlines()]
    files = {"heard": [r for r in records if "audios" in r], "seen": [r for r in records if "audios" not in r]}
    for name, chosen in files.items():
        (dataset.parent / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return {name: dataset.parent / f"{name}.jsonl" for name in files}


BESIDE = [  # stage 2 of the micro recipe and the stage that trains beside it, in small
    {"name": "hear", "components": {"audio_adapter": "full"}, "lr": {"default": 3e-3}, "steps": 4, "batch_tokens": 512},
    {"name": "see", "components": {"vision_adapter": "full", "llm": "full"}, "lr": {"default": 3e-3}, "steps": 4,
     "batch_tokens": 512, "beside": "hear"},
]


def test_a_stage_beside_the_one_before_ends_with_the_weights_of_running_them_in_turn(tmp_path, dataset, monkeypatch,
                                                                                    capsys):
    from omniforge.train import loop

    files = split_by_media(dataset)
    stages = [{**s, "data": [{"path": str(files["heard" if s["name"] == "hear" else "seen"])}]} for s in BESIDE]
    threads = torch.get_num_threads()
    exported, printed = {}, {}
    for side_by_side in (False, True):
        recipe = load_recipe(write_recipe(tmp_path / str(side_by_side), dataset, stages))
        monkeypatch.setattr(loop, "_side_by_side_pays", lambda dist: side_by_side)
        torch.set_num_threads(2 if side_by_side else 1)  # one thread a stage either way: the same sums, bit for bit
        ends = {}
        try:
            loop.train(recipe, on_stage_end=lambda stage, model, export: ends.update(
                {stage.name: {k: v.clone() for k, v in model.state_dict().items()}}))
        finally:
            torch.set_num_threads(threads)
        printed[side_by_side] = capsys.readouterr().out
        run = Path(recipe.train.out_dir)
        steps = [(r["stage"], r["step"]) for r in metrics(run) if "loss" in r]
        assert sorted(steps) == [(name, i) for name in ("hear", "see") for i in range(1, 5)]
        exported[side_by_side] = {name: OmniModel.from_pretrained(run / "stages" / name).state_dict()
                                  for name in ("hear", "see")}
        for name, weights in ends.items():  # what on_stage_end saw is what was exported
            assert all(torch.equal(weights[k], exported[side_by_side][name][k]) for k in weights)
    assert "trained beside hear" in printed[True] and "trained beside" not in printed[False]
    for name in ("hear", "see"):
        assert all(torch.equal(exported[True][name][k], exported[False][name][k]) for k in exported[False][name]), name
    hear, see = exported[True]["hear"], exported[True]["see"]
    loop._seed_everything(recipe.train.seed)  # as train() does before building the model
    before = OmniModel.from_config(recipe.model).state_dict()
    changed = {k for k in see if not torch.equal(see[k], hear[k])}
    assert changed and all(k.startswith(("vision_adapter.", "llm.")) for k in changed)  # what "see" trains
    assert all(torch.equal(see[k], hear[k]) for k in see if k.startswith("audio_adapter."))  # as "hear" left it
    assert any(not torch.equal(hear[k], before[k]) for k in hear if k.startswith("audio_adapter."))


@pytest.mark.parametrize("side_by_side", [False, True])
def test_a_stage_beside_one_whose_components_its_data_reaches_is_refused(tmp_path, dataset, monkeypatch, side_by_side):
    from omniforge.train import loop

    stages = [{**s, "data": [{"path": str(dataset)}]} for s in BESIDE]  # "see" would hear the audio records too
    recipe = load_recipe(write_recipe(tmp_path, dataset, stages))
    monkeypatch.setattr(loop, "_side_by_side_pays", lambda dist: side_by_side)
    with pytest.raises(ConfigError, match="stages.see.beside: its data reaches audio_adapter, which stage hear trains"):
        loop.train(recipe)


def test_the_loss_plot_keeps_each_stage_whole_when_two_trained_at_once_or_one_ran_again():
    from omniforge.train.plots import _segments

    order = [("a", 1), ("a", 2), ("b", 1), ("c", 1), ("b", 2), ("c", 2), ("c", 3), ("b", 1)]  # c beside b; b again
    segments = _segments([{"stage": stage, "step": step, "loss": 1.0} for stage, step in order])
    assert [(stage, [r["step"] for r in records]) for stage, records in segments] == [
        ("a", [1, 2]), ("b", [1, 2]), ("c", [1, 2, 3]), ("b", [1])]


def test_a_torn_metrics_line_breaks_neither_the_plot_nor_the_run(tmp_path, monkeypatch):
    from omniforge.train import loop, plots

    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"stage": "a", "step": i, "loss": 1.0 / i}) for i in (1, 2)]
    metrics.write_text("\n".join(lines) + '\n{"stage": "a", "st')  # killed mid-write
    log = loop._Log(tmp_path, True)  # the run that resumes
    said = []
    log.print = said.append
    log.evals("a", 2, {"qa": 50.0})
    log.plot()
    assert json.loads(metrics.read_text().splitlines()[-1]) == {"stage": "a", "step": 2, "eval": {"qa": 50.0}}
    assert (tmp_path / "loss.png").stat().st_size > 1000 and not [m for m in said if "warning" in m]

    def fail(*_):
        raise RuntimeError("no display")

    monkeypatch.setattr(plots, "plot_losses", fail)
    log.plot()
    assert said[-1] == f"warning: {tmp_path / 'loss.png'} not drawn (RuntimeError: no display)"


def _weights(folder: Path) -> dict:
    return OmniModel.from_pretrained(folder).state_dict()


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, dataset):
    stages = [dict(STAGES[0], steps=30, lr={"default": 1e-3}), dict(STAGES[1], steps=4)]
    straight = write_recipe(tmp_path / "a", dataset, stages, checkpoint_every=5)
    killed = write_recipe(tmp_path / "b", dataset, stages, checkpoint_every=5)
    process = subprocess.Popen([sys.executable, "-m", "omniforge.cli", "train", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = tmp_path / "b" / "run" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (tmp_path / "b" / "run" / "stages" / "all").exists()  # killed mid-run
    resumed = run_cli("train", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed stage align at step" in resumed.stdout
    assert run_cli("train", straight).returncode == 0
    a, b = _weights(tmp_path / "a" / "run" / "stages" / "all"), _weights(tmp_path / "b" / "run" / "stages" / "all")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_goes_on_after_a_stage_that_finished_since_the_last_checkpoint(tmp_path, dataset):
    recipe = write_recipe(tmp_path, dataset, STAGES, checkpoint_every=5)
    assert run_cli("train", recipe, "--stage", "align").returncode == 0  # a checkpoint at step 5, then the export
    resumed = run_cli("train", recipe, "--resume")  # as if killed before stage all's first checkpoint
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage align has finished" in resumed.stdout and "starting stage all from" in resumed.stdout
    steps = [(r["stage"], r["step"]) for r in metrics(tmp_path / "run") if "loss" in r]
    assert steps == [("align", i) for i in range(1, 7)] + [("all", i) for i in range(1, 7)]  # align not repeated
    again = run_cli("train", recipe, "--resume")
    assert again.returncode == 0 and "every stage has finished" in again.stdout
    write_recipe(tmp_path, dataset, [STAGES[0], dict(STAGES[1], steps=3)], checkpoint_every=5)  # an edited recipe
    edited = run_cli("train", recipe, "--resume")
    assert edited.returncode == 0, edited.stderr[-3000:]
    assert "other settings of steps; running all again" in edited.stdout  # the export, then its checkpoint:
    assert "other settings of steps; starting stage all again" in edited.stdout
    assert [r["step"] for r in metrics(tmp_path / "run") if "loss" in r][-4:] == [6, 1, 2, 3]  # only all, anew


def test_resume_goes_on_from_the_first_stage_whose_export_the_recipe_no_longer_matches(tmp_path, dataset, monkeypatch):
    from omniforge.train import loop

    path = write_recipe(tmp_path, dataset, STAGES)
    path.write_text(path.read_text().replace(str(dataset), os.path.relpath(dataset, tmp_path)))
    recipe = load_recipe(path)
    align, everything = recipe.stages
    out = tmp_path / "run"

    def export(stage, at):
        record = out / "stages" / stage.name / "stage.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(loop._settings(recipe, stage)))
        os.utime(record, (at, at))

    export(align, 100.0)
    checkpoint = {"stage": "all", "settings": loop._settings(recipe, everything), "written": 200.0, "folder": "ckpt"}
    log = loop._Log(out, False)

    def resume(*overrides, spelled=path):
        edited = load_recipe(spelled, list(overrides))
        stages, state = loop._resume_point(edited, edited.stages, checkpoint, out, log)
        return [s.name for s in stages], state is checkpoint

    assert resume() == (["all"], True)
    monkeypatch.chdir(tmp_path)
    assert resume(spelled=Path("recipe.yaml")) == (["all"], True)  # the same data, however the recipe is named
    no_weight_changes = ("stages.1.eval_every=2", "train.checkpoint_every=7", "train.sample_cache_gb=2")
    assert resume(*no_weight_changes) == (["all"], True)
    assert resume("stages.0.lr.default=0.1") == (["align", "all"], False)  # all's checkpoint built on another align
    assert resume("train.weight_decay=0.1") == (["align", "all"], False)
    assert resume("train.lora.r=4") == (["all"], False)  # LoRA settings shape only stage all's weights
    moved = tmp_path / "moved" / "here"
    copy = Path(os.path.normpath(moved / os.path.relpath(dataset, tmp_path)))
    copy.parent.mkdir(parents=True)
    shutil.copy(dataset, copy)
    assert resume(f"data_dir={moved}") == (["all"], True)  # the data moved, nothing changed
    export(align, 300.0)  # align ran again after the checkpoint, which goes on from the align before
    assert resume() == (["all"], False)
    export(everything, 400.0)
    assert resume() == ([], False)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, dataset, kind):
    stage = {"name": "all", "components": {"vision_adapter": "full", "audio_adapter": "full", "llm": "full"},
             "lr": {"default": 1e-3}, "steps": 4}
    one = write_recipe(tmp_path / "one", dataset, [dict(stage, batch_size=4)])
    two = write_recipe(tmp_path / "two", dataset, [dict(stage, batch_size=2)], distributed=kind)
    assert run_cli("train", one).returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "omniforge.cli", "train", str(two)]
    result = subprocess.run(torchrun, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    single = [r["loss"] for r in metrics(tmp_path / "one" / "run") if "loss" in r]
    double = [r["loss"] for r in metrics(tmp_path / "two" / "run") if "loss" in r]
    assert len(single) == len(double) == 4
    assert single == pytest.approx(double, rel=1e-4, abs=1e-5)
    a, b = _weights(tmp_path / "one" / "run" / "stages" / "all"), _weights(tmp_path / "two" / "run" / "stages" / "all")
    # AdamW divides each gradient by its own running scale, so where a gradient is near zero the
    # all-reduce's other summation order shows up in the weight (1.5e-5 on one element of 49,152 on
    # one CPU); a rank that did not sync would be off by about lr (1e-3) a step
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4)


def test_packed_gradients_equal_the_sum_over_separate_samples(dataset, monkeypatch):
    import transformers.masking_utils

    # omniforge_sdpa splits packed rows at cu_seq_lens itself: transformers' (L, L) block mask would never be read
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices",
                        lambda *_: pytest.fail("transformers built a packed-sequence mask"))
    torch.manual_seed(0)
    model = OmniModel.from_config(load_config(TINY_MODEL)).train()
    processor = OmniProcessor.from_model(model)
    stream = SampleStream(open_mixture([DatasetSpec(str(dataset))], seed=0), processor)
    batch = next(PackedBatches(stream, processor, budget=640))
    labelled = batch.labelled
    model(**batch.inputs, num_items_in_batch=labelled).loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    stream = SampleStream(open_mixture([DatasetSpec(str(dataset))], seed=0), processor)
    for _ in range(batch.samples):
        model(**processor.collate([next(stream).sample]), num_items_in_batch=labelled).loss.backward()
    assert packed.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in packed.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, atol=1e-5, rtol=1e-3)
