"""The training loop: stages run in order, each from the weights the previous one left.

    omniforge train recipes/tiny.yaml [key=value ...] [--stage NAME] [--resume] [--dry-run]
    torchrun --nproc_per_node 8 -m omniforge.cli train recipes/capybara_7b.yaml

Per stage: set trainability (frozen / full / LoRA per component) -> AdamW groups per
component -> warmup + cosine -> micro-batches (packed or padded) -> loss normalised by the
labelled tokens of the whole optimizer step (across micro-batches and processes) -> clip ->
step. Resumable checkpoints (weights, optimizer, scheduler, RNG, data position) are written
atomically every `checkpoint_every` steps; every stage ends with an exported model folder
that records what was trained. A stage `beside` the one before trains at the same time, in a
process of its own, to the weights of running them in turn (`_Beside`).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from omniforge.data.dataset import SampleCache, SampleStream, mean_sample_tokens, open_mixture
from omniforge.data.packing import MicroBatch, PackedBatches, PaddedBatches, Prefetch
from omniforge.errors import CheckpointError, ConfigError
from omniforge.files import atomic_folder, write_text_atomic
from omniforge.model.omni import OmniModel
from omniforge.processing.chat import OmniProcessor
from omniforge.train.components import (
    ComponentRow,
    check_stage_parts,
    component_of,
    configure_stage,
    format_table,
    merge_lora,
    param_groups,
)
from omniforge.train.distributed import Distributed
from omniforge.train.evaluate import Evaluator
from omniforge.train.recipe import COMPONENTS, MODULE_OF, Recipe, StageConfig

CHECKPOINTS, STAGES = "checkpoints", "stages"


def train(recipe: Recipe, only_stage: str | None = None, resume: bool = False,
          on_stage_end: Callable[[StageConfig, OmniModel, Path], None] | None = None) -> Path:
    """Run the recipe (or one stage of it); returns the folder of the last exported stage.

    on_stage_end(stage, model, export_folder) runs on the main process after each stage's
    export (e.g. the demo's per-modality evaluation).
    """
    dist = Distributed.from_environment()
    out = Path(recipe.train.out_dir)
    log = _Log(out, dist.is_main)
    requested = [recipe.stage(only_stage)] if only_stage else recipe.stages
    stages, state = _resume_point(recipe, requested, _latest_checkpoint(out), out, log) if resume else (requested, None)
    if not stages:
        log.print("--resume: every stage has finished already")
        return out / STAGES / requested[-1].name
    if missing := recipe.missing_files(stages):  # what would stop a stage fails now, not after hours of those before it
        raise ConfigError(f"{len(missing)} data file(s) missing: {', '.join(missing)}")
    for stage in stages:
        if dist.world > 1 and recipe.train.distributed == "fsdp" and "lora" in stage.components.values():
            raise ConfigError(f"stages.{stage.name}: LoRA cannot be injected into FSDP shards; "
                              "use train.distributed=ddp for LoRA stages")
    if state is not None and len(state["ranks"]) != dist.world:
        raise CheckpointError(f"{state['folder']}: written by {len(state['ranks'])} process(es), resumed with "
                              f"{dist.world}; each process's data position is saved, so resume with as many")

    _seed_everything(recipe.train.seed)  # the recipe's model initialises from it; each stage then seeds its own
    model = _initial_model(recipe, stages[0], out, log)
    for stage in stages:
        check_stage_parts(model, stage)
    model.to(dist.device)
    processor = OmniProcessor.from_model(model)
    evaluator = Evaluator(recipe.evals, processor, warn=log.print) if recipe.evals else None
    cache = _sample_cache(recipe)
    export, beside = None, None
    try:
        for before, stage, after in zip([None, *stages], stages, [*stages[1:], None]):
            if beside is not None:  # trained beside the stage before, in a process of its own: its weights join
                rows, steps, skipped = beside.join(model, log)
                beside = None
                export = export_stage(recipe, stage, model, rows, steps, skipped, evaluator, dist, log)
            else:
                resumed = state if state is not None and state["stage"] == stage.name else None
                if after is not None and after.beside == stage.name and resumed is None and _side_by_side_pays(dist):
                    beside = _Beside(recipe, after, stage, model)
                unread = before if before is not None and stage.beside == before.name else None
                export = run_stage(recipe, stage, model, processor, evaluator, dist, log, resumed, cache, beside, unread)
            state = None
            if on_stage_end is not None and dist.is_main:
                on_stage_end(stage, model, export)
            dist.barrier()
    finally:
        if beside is not None:  # an error here: nothing will join the stage beside
            beside.stop()
    dist.close()
    return export


def run_stage(recipe: Recipe, stage: StageConfig, model: OmniModel, processor: OmniProcessor,
              evaluator: Evaluator | None, dist: Distributed, log: "_Log", state: dict | None,
              cache: SampleCache | None = None, beside: "_Beside | None" = None,
              unread: StageConfig | None = None) -> Path:
    """Train `stage` and export it; returns the export folder. beside: a stage training meanwhile
    in a process of its own (this one takes all of torch's threads again once it is done). unread:
    the stage this one is `beside`, whose components its data must not reach."""
    rows, steps, skipped = fit_stage(recipe, stage, model, processor, evaluator, dist, log, state, cache, beside, unread)
    return export_stage(recipe, stage, model, rows, steps, skipped, evaluator, dist, log, cache)


def fit_stage(recipe: Recipe, stage: StageConfig, model: OmniModel, processor: OmniProcessor,
              evaluator: Evaluator | None, dist: Distributed, log: "_Log", state: dict | None,
              cache: SampleCache | None = None, beside: "_Beside | None" = None,
              unread: StageConfig | None = None) -> tuple[list[ComponentRow], int, dict]:
    """The training of `run_stage`: its component rows, steps and skipped samples by reason."""
    settings = recipe.train
    out = Path(settings.out_dir)
    if state is None:  # from its own seed, as when the stages before it ran in an earlier process (--resume, --stage)
        _seed_everything(recipe.stage_seed(stage))
    rows = configure_stage(model, stage, settings.lora)
    if settings.activation_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.run_all_encoders = dist.world > 1
    wrapped = dist.wrap(model, settings.distributed)
    if state is not None:  # the checkpoint holds the weights of this stage's architecture (LoRA included)
        dist.load_model_state(model, torch.load(Path(state["folder"]) / "model.pt", weights_only=True))
    optimizer = adamw(param_groups(model, stage, settings.weight_decay), betas=(0.9, 0.95))
    mixture = open_mixture(stage.data, recipe.stage_seed(stage))  # each stage its own order of a file they share
    mean_tokens = (mean_sample_tokens(mixture, processor) or 1) if stage.epochs and stage.batch_tokens else None
    steps = stage.total_steps(mixture.size, dist.world, mean_tokens)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(stage.warmup_steps, steps,
                                                                            stage.min_lr_ratio))
    start_step, position = 0, 0
    if state is not None:
        dist.load_optimizer_state(model, optimizer, torch.load(Path(state["folder"]) / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(state["scheduler"])
        start_step, position = state["step"], state["ranks"][dist.rank]["position"]
        _set_rng(state["ranks"][dist.rank]["rng"])
        log.print(f"resumed stage {stage.name} at step {start_step} (stream position {position})")
    stream = SampleStream(mixture, processor, start=position, rank=dist.rank, world=dist.world, warn=log.print,
                          cache=cache)
    batches = (PackedBatches(stream, processor, stage.batch_tokens, skip_long=settings.skip_long_samples)
               if stage.batch_tokens else PaddedBatches(stream, processor, stage.batch_size))
    if _prefetch_pays(dist.device):
        batches = Prefetch(batches)
    log.print(f"\n== stage {stage.name}: {steps} steps x {stage.grad_accum} micro-batches x {dist.world} "
              f"process(es) of {_batch_words(stage)}\n{format_table(rows)}")

    autocast = (torch.autocast(dist.device.type, dtype=torch.bfloat16) if settings.precision == "bf16"
                else nullcontext())
    progress = log.progress(steps, start_step, stage.name)
    refusals = _refuse_reads(model, unread, stage) if unread is not None else []
    wrapped.train()
    for step in range(start_step + 1, steps + 1):
        if beside is not None:
            beside.poll()
        started = time.perf_counter()
        micro = [next(batches) for _ in range(stage.grad_accum)]  # endless: the mixture repeats its data
        labelled = dist.sum(sum(m.labelled for m in micro))
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            inputs = {k: v.to(dist.device) if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
            with dist.no_sync(wrapped, last=i == len(micro) - 1), autocast:
                # HF divides the summed token losses by this: the whole step's labelled tokens
                # per process, so that the data-parallel gradient average is the global mean
                loss = wrapped(**inputs, num_items_in_batch=max(labelled, 1) / dist.world).loss
            loss.backward()
            loss_sum += loss.item() / dist.world
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm).item()
                     if settings.max_grad_norm > 0 else float("nan"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = dist.sum(sum(m.tokens for m in micro))
        capacity = dist.sum(sum(m.capacity for m in micro))
        record = {"stage": stage.name, "step": step, "loss": dist.sum(loss_sum), "grad_norm": grad_norm,
                  "lr": {g["component"]: g["lr"] for g in optimizer.param_groups}, "tokens": tokens,
                  "padding_waste": round(1 - tokens / capacity, 4), "seconds": time.perf_counter() - started,
                  "skipped": dict(stream.skipped)}
        log.step(record, progress)
        if settings.checkpoint_every and step % settings.checkpoint_every == 0 and step < steps:
            _save_checkpoint(model, optimizer, scheduler, stage, _settings(recipe, stage), step, micro[-1], dist, out,
                             settings.keep_checkpoints)
        if evaluator and stage.eval_every and step % stage.eval_every == 0 and step < steps:
            log.evals(stage.name, step, evaluator.run(model))
    progress.close()
    for refusal in refusals:
        refusal.remove()
    if isinstance(batches, Prefetch):
        batches.close()
    merge_lora(model)
    for parameter in model.parameters():
        parameter.requires_grad = False
    return rows, steps, dict(stream.skipped)


def export_stage(recipe: Recipe, stage: StageConfig, model: OmniModel, rows: list[ComponentRow], steps: int,
                 skipped: dict, evaluator: Evaluator | None, dist: Distributed, log: "_Log",
                 cache: SampleCache | None = None) -> Path:
    """The end of `run_stage`: the model folder with its stage.json, the stage-end evals, the plot."""
    out = Path(recipe.train.out_dir)
    export = out / STAGES / stage.name
    weights = dist.full_state_dict(model)  # collective under FSDP
    if dist.is_main:
        record = {**_settings(recipe, stage), "components": [asdict(r) for r in rows], "steps": steps,
                  "skipped_samples": skipped}
        model.save_pretrained(export, state_dict=weights, extra_files={"stage.json": json.dumps(record, indent=2)})
    if evaluator:
        log.evals(stage.name, steps, evaluator.run(model))
    log.plot()
    dist.barrier()
    log.print(f"stage {stage.name} done -> {export}" + (f" ({cache.summary()})" if cache is not None else ""))
    return export


# --------------------------------------------------------------------------- pieces


def _initial_model(recipe: Recipe, first: StageConfig, out: Path, log: "_Log") -> OmniModel:
    """The model a run starts from: the previous stage's export when starting mid-recipe."""
    names = [s.name for s in recipe.stages]
    index = names.index(first.name)
    if index:
        previous = out / STAGES / names[index - 1]
        if (previous / "config.yaml").is_file():
            log.print(f"starting stage {first.name} from {previous}")
            model = OmniModel.from_pretrained(previous)
            differing = _model_differences(recipe.model, model.config)
            if differing:
                log.print(f"warning: the recipe's model sets {', '.join(differing)} differently from {previous}; "
                          f"the export's settings are used (edit {previous / 'config.yaml'} to change them)")
            return model
        log.print(f"warning: no export of stage {names[index - 1]} in {out / STAGES}; "
                  f"stage {first.name} starts from the recipe's model")
    return OmniModel.from_config(recipe.model)


def _model_differences(ours, export) -> list[str]:
    """Dotted model settings that differ between two OmniConfigs, where each part's weights live
    (path, arch, tokenizer: an export names its own subfolders) aside."""
    def flat(node: dict, prefix: str = "") -> dict:
        items = {}
        for key, value in node.items():
            items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return items

    a, b = flat(asdict(ours)), flat(asdict(export))
    located = ("path", "tokenizer")
    return [k for k in a if a[k] != b.get(k) and ".arch." not in f".{k}" and k.split(".")[-1] not in located]


def _prefetch_pays(device: torch.device) -> bool:
    """Build batches in a background thread only where it does not take cores from the step: on
    an accelerator, or with a core beyond torch's intra-op threads. (2 cores, 2 threads: a
    prefetch thread made the micro recipe's stage-1b steps 655 ms, against 451 ms inline.)"""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return device.type != "cpu" or cores > torch.get_num_threads()


def _sample_cache(recipe: Recipe) -> SampleCache | None:
    return SampleCache(int(recipe.train.sample_cache_gb * 2**30)) if recipe.train.sample_cache_gb else None


def _side_by_side_pays(dist: Distributed) -> bool:
    """Whether a stage `beside` the one before trains at the same time: in one process on a CPU with
    threads to split (under torchrun each process holds a share of the batch already)."""
    return dist.world == 1 and dist.device.type == "cpu" and torch.get_num_threads() >= 2


class _Beside:
    """A stage training in a spawned process while this one trains the stage before it, each on half
    of torch's threads, from the same weights. A step of a small model uses a second thread poorly
    (1.4x on two cores), two processes use both: stages 2 and 2b of the micro recipe 167 -> 142 s
    (BENCHMARKS.md, session 32). The weights come out as if the two ran in turn: they train
    different components, and the later one's data reaches none of the earlier one's (refused as it
    trains); the earlier one reads the later one's components as they were, as it would have."""

    def __init__(self, recipe: Recipe, stage: StageConfig, before: StageConfig, model: OmniModel):
        import multiprocessing

        self.threads = torch.get_num_threads()
        alone = replace(recipe, train=replace(recipe.train, checkpoint_every=0))  # this process's checkpoints stand for both
        weights = {key: value.clone() for key, value in model.state_dict().items()}  # sent while this process trains
        # spawn, not fork: a forked child of a process whose OpenMP pool has started can hang in it
        self.pool = multiprocessing.get_context("spawn").Pool(1, torch.set_num_threads, (self.threads - self.threads // 2,))
        self.result = self.pool.apply_async(_fit_beside, (alone, stage.name, before.name, model.config, weights))
        torch.set_num_threads(self.threads // 2)

    def poll(self) -> None:
        """Once the stage beside is done, take all of torch's threads again (or raise its error now)."""
        if self.result.ready() and torch.get_num_threads() < self.threads:
            self.result.get()
            torch.set_num_threads(self.threads)

    def join(self, model: OmniModel, log: "_Log") -> tuple[list[ComponentRow], int, dict]:
        """Wait for the stage beside; its trained components join `model`; returns what `fit_stage` does."""
        try:
            trained, rows, steps, skipped, lines = self.result.get()
        finally:
            self.stop(at_once=not (self.result.ready() and self.result.successful()))
        for line in lines:
            log.print(line)
        model.load_state_dict(trained, strict=False)
        return rows, steps, skipped

    def stop(self, at_once: bool = True) -> None:
        """End the process: at once where an error leaves a stage unfinished (a process ended at once
        can leave a semaphore of the pool's behind, which Python then warns about)."""
        if at_once:
            self.pool.terminate()
        else:
            self.pool.close()
        self.pool.join()
        torch.set_num_threads(self.threads)


def _fit_beside(recipe: Recipe, name: str, before: str, config, weights: dict) -> tuple:
    """`_Beside`'s process: stage `name` from `weights`, with no evals (the stage-end ones run on the
    joined weights); the weights of the components it trains, `fit_stage`'s results and its log lines."""
    stage = recipe.stage(name)
    model = OmniModel.from_config(config)
    model.load_state_dict(weights)
    lines = [f"(stage {name} trained beside {before}, in a process of its own)"]
    log = _Log(Path(recipe.train.out_dir), True, lines)
    rows, steps, skipped = fit_stage(recipe, stage, model, OmniProcessor.from_model(model), None,
                                     Distributed.from_environment(), log, None, _sample_cache(recipe),
                                     unread=recipe.stage(before))
    trained = {key: value for key, value in model.state_dict().items() if stage.mode(component_of(key)) != "frozen"}
    return trained, rows, steps, skipped, lines


def _refuse_reads(model: OmniModel, before: StageConfig, stage: StageConfig) -> list:
    """Hooks that stop `stage` where its data reaches a component `before` trains: `beside` it, it
    would read that component as it was, not as `before` left it."""
    def refuse(component: str):
        def hook(*_):
            raise ConfigError(f"stages.{stage.name}.beside: its data reaches {component}, which stage {before.name} "
                              f"trains; it cannot train beside it (remove `beside`, or its records with that media)")
        return hook

    return [getattr(model, MODULE_OF[c]).register_forward_pre_hook(refuse(c)) for c in COMPONENTS
            if before.mode(c) != "frozen" and getattr(model, MODULE_OF[c]) is not None]


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with its fused kernel: one pass over all tensors, where the default loops over them
    (on this CPU: the vision stand-in's step 51 -> 45 ms, the tiny LLM's 172 -> 167 ms)."""
    return torch.optim.AdamW(params, fused=True, **kwargs)


def warmup_cosine(warmup: int, steps: int, floor: float) -> Callable[[int], float]:
    """The learning-rate factor at step i (from 0): linear warm-up to 1, then cosine down to `floor`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _batch_words(stage: StageConfig) -> str:
    return f"{stage.batch_tokens} packed tokens" if stage.batch_tokens else f"{stage.batch_size} padded samples"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(model, optimizer, scheduler, stage: StageConfig, settings: dict, step: int, batch: MicroBatch,
                     dist: Distributed, out: Path, keep: int) -> None:
    """Weights (LoRA included), optimizer, scheduler, per-process RNG and data position, and the
    stage's `_settings`; atomic.

    torch.save keeps tied weights (embeddings / LM head) as one tensor; exports use safetensors.
    """
    ranks = dist.gather({"position": batch.resume_at, "rng": _rng_state()})
    state_dict = dist.full_state_dict(model)
    optimizer_state = dist.full_optimizer_state(model, optimizer)
    if not dist.is_main:
        return
    folder = out / CHECKPOINTS / f"step-{stage.name}-{step:07d}"
    with atomic_folder(folder) as tmp:  # replaces a folder of the same step left by an earlier run
        torch.save(state_dict, tmp / "model.pt")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save({"stage": stage.name, "settings": settings, "step": step, "scheduler": scheduler.state_dict(),
                    "ranks": ranks, "written": time.time()}, tmp / "state.pt")
    write_text_atomic(out / CHECKPOINTS / "latest", folder.name)
    for old in sorted((out / CHECKPOINTS).glob("step-*"), key=lambda p: p.stat().st_mtime)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(out: Path) -> dict | None:
    pointer = out / CHECKPOINTS / "latest"
    if not pointer.is_file():
        return None
    folder = out / CHECKPOINTS / pointer.read_text().strip()
    try:
        state = torch.load(folder / "state.pt", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot read state.pt ({e}); {pointer} names it as the latest "
                              "checkpoint (point it at another one, or delete it to start over)") from None
    state["folder"] = str(folder)
    return state


def _resume_point(recipe: Recipe, stages: list[StageConfig], state: dict | None, out: Path,
                  log: "_Log") -> tuple[list[StageConfig], dict | None]:
    """The stages --resume still has to run, and the checkpoint to start the first from (None: from
    the previous stage's export, or the recipe's model).

    In order, a stage has finished when its export was made with the settings the recipe gives it
    now, after the export of the stage before it (the weights it starts from) and after the latest
    checkpoint, if that is in this stage (an older export is an earlier run's). The first stage that
    has not runs again, and every stage after it: from that checkpoint if it is in this stage and
    was written with the same settings, after the previous stage's export; else from its start.
    """
    names = [s.name for s in stages]
    if state is not None and state["stage"] not in names:
        raise ConfigError(f"--resume: the latest checkpoint ({state['folder']}) is in stage {state['stage']!r}, "
                          f"not among {names}")
    since = 0.0  # when the stage before was exported
    for i, stage in enumerate(stages):
        checkpoint = state if state is not None and state["stage"] == stage.name else None
        after = max(since, checkpoint["written"]) if checkpoint is not None else since
        exported = _exported_at(recipe, stage, out / STAGES / stage.name, after, log)
        if exported is not None:
            since = exported
            continue
        if i:
            log.print(f"--resume: stage {names[i - 1]} has finished and was exported; going on from there")
        if checkpoint is None:
            if state is not None and names.index(state["stage"]) > i:
                log.print(f"--resume: not going on from {state['folder']}: its stage {state['stage']} comes after "
                          f"stage {stage.name}, which runs again")
            elif state is None and not i:
                log.print(f"--resume: no checkpoint in {out / CHECKPOINTS} and no stage finished; starting from the beginning")
            return stages[i:], None
        if checkpoint["written"] <= since:
            log.print(f"--resume: {checkpoint['folder']} was written before the export of stage {names[i - 1]} it would "
                      f"go on from; starting stage {stage.name} again")
            return stages[i:], None
        if changed := _changed_settings(_settings(recipe, stage), checkpoint.get("settings", {})):
            log.print(f"--resume: {checkpoint['folder']} was written with other settings of {', '.join(changed)}; "
                      f"starting stage {stage.name} again")
            return stages[i:], None
        return stages[i:], checkpoint
    return [], None


def _exported_at(recipe: Recipe, stage: StageConfig, export: Path, after: float, log: "_Log") -> float | None:
    """When `stage` was exported to `export` (its stage.json is written last, inside the atomic
    folder), if after `after` and with the settings the recipe gives it now; else None."""
    record = export / "stage.json"
    written = record.stat().st_mtime if record.is_file() else None
    if written is None or written <= after:
        return None
    if changed := _changed_settings(_settings(recipe, stage), json.loads(record.read_text())):
        log.print(f"--resume: {export} was made with other settings of {', '.join(changed)}; running {stage.name} again")
        return None
    return written


NOT_COMPARED = {"eval_every", "beside", "train.out_dir", "train.checkpoint_every", "train.keep_checkpoints",
                "train.activation_checkpointing", "train.distributed", "train.sample_cache_gb"}
"""Settings --resume lets change: where a run writes, how often it evaluates and saves, and how it
spreads, caches and recomputes its work do not change what its weights are trained on, or towards."""


def _settings(recipe: Recipe, stage: StageConfig) -> dict:
    """What a stage was trained with, as its stage.json and checkpoints record it: the stage's settings
    (data paths relative to `data_dir`, so that moving the data is no change) and the recipe's `train`
    settings that shape the weights."""
    settings = asdict(stage)
    for spec in settings["data"]:
        spec["path"] = os.path.relpath(spec["path"], recipe.data_dir)
    train = asdict(recipe.train)
    if "lora" not in stage.components.values():
        del train["lora"]  # shapes no weight of this stage
    return {"stage": settings, "train": train}


def _changed_settings(now: dict, then: dict) -> list[str]:
    """The settings (`steps`, `train.seed`) that differ between two `_settings` records, `then` as an
    earlier run wrote it (one without `train` settings predates their recording: those all differ)."""
    def flat(record: dict) -> dict:
        record = json.loads(json.dumps(record))  # tuples as lists, as in stage.json
        keyed = {**record.get("stage", {}), **{f"train.{k}": v for k, v in record.get("train", {}).items()}}
        return {key: value for key, value in keyed.items() if key not in NOT_COMPARED}

    a, b = flat(now), flat(then)
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


class _Log:
    """Progress bar, metrics.jsonl and the loss plot (main process only). lines: where printed
    lines go instead, with no progress bar (a process whose lines another prints)."""

    def __init__(self, out: Path, enabled: bool, lines: list[str] | None = None):
        self.out, self.enabled, self.lines = out, enabled, lines
        if enabled:
            out.mkdir(parents=True, exist_ok=True)
            if lines is None:  # else another process, which has done this, writes beside this one
                self._end_torn_line()

    def _end_torn_line(self) -> None:
        """A run killed mid-write leaves the last line of metrics.jsonl unfinished: end it, so that this
        run's records stand on lines of their own (the plot skips the torn one)."""
        metrics = self.out / "metrics.jsonl"
        if metrics.is_file() and metrics.stat().st_size:
            with metrics.open("rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def print(self, message: str) -> None:
        if self.lines is not None:
            self.lines.append(message)
        elif self.enabled:
            from tqdm import tqdm

            tqdm.write(message)

    def progress(self, total: int, initial: int, name: str):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=name, disable=not self.enabled or self.lines is not None,
                    dynamic_ncols=True, mininterval=1.0)

    def step(self, record: dict, progress) -> None:
        if not self.enabled:
            return
        self._append(record)
        tokens_per_second = record["tokens"] / max(record["seconds"], 1e-9)
        progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_second:.0f}", refresh=False)
        progress.update(1)

    def evals(self, stage: str, step: int, scores: dict) -> None:
        if not self.enabled:
            return
        self._append({"stage": stage, "step": step, "eval": scores})
        self.print(f"  eval @ {stage} step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))

    def _append(self, record: dict) -> None:
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        if not self.enabled:
            return
        from omniforge.train.plots import plot_losses

        try:
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        except Exception as e:  # a picture of metrics.jsonl, which holds the numbers: never worth the run
            self.print(f"warning: {self.out / 'loss.png'} not drawn ({type(e).__name__}: {e})")
