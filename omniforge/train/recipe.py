"""Recipes as data: a model config and a list of stages, each with its data, trainable parts, LRs.

```yaml
model: models/tiny.yaml          # a model config file (relative to the recipe) or an inline mapping
train: {seed: 0, out_dir: runs/tiny, checkpoint_every: 100}
stages:
  - name: 1a_visual_alignment
    data: [{path: data/captions.jsonl, weight: 1.0}]
    components: {vision_adapter: full}      # everything not named is frozen
    lr: {default: 1.0e-3}
    steps: 200
    batch_tokens: 2048                       # packed; or batch_size: 8 (padded)
```

Component names: `vision_tower`, `vision_adapter`, `audio_tower`, `audio_adapter`, `llm`; each
`frozen` (default), `full` or `lora`. Parameters belong to components by module path.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from omniforge.config import OmniConfig, apply_overrides, from_dict, read_yaml, require
from omniforge.errors import ConfigError

COMPONENTS = ("vision_tower", "vision_adapter", "audio_tower", "audio_adapter", "llm")
MODULE_OF = {"vision_tower": "vision", "vision_adapter": "vision_adapter", "audio_tower": "audio",
             "audio_adapter": "audio_adapter", "llm": "llm"}
"""The attribute of `OmniModel` that holds each component."""

Mode = Literal["frozen", "full", "lora"]


@dataclass
class DatasetSpec:
    """One JSONL conversation file in a stage's mixture."""

    path: str
    """JSONL file; media paths inside resolve against its folder."""
    weight: float = 1.0
    """Relative sampling weight within the stage's mixture."""

    def validate(self, key: str) -> None:
        require(self.weight > 0, f"{key}.weight", "must be > 0")


@dataclass
class LoraSpec:
    """LoRA settings, used by every component whose mode is `lora`."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0

    def validate(self, key: str) -> None:
        require(self.r >= 1, f"{key}.r", f"must be >= 1, got {self.r}")
        require(self.alpha > 0, f"{key}.alpha", f"must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, f"{key}.dropout", f"must be within [0, 1), got {self.dropout}")


@dataclass
class EvalSpec:
    """A held-out set watched during training (the forgetting monitor)."""

    name: str
    """Shown in logs, e.g. `image_qa`."""
    path: str
    """JSONL conversations; the last assistant turn is the reference answer."""
    metric: Literal["loss", "exact_match", "wer", "bleu"] = "exact_match"
    """`loss`: teacher-forced loss on the answers; the others score greedy answers: `exact_match`
    (% right, normalised), `wer` (word error rate, %), `bleu` (corpus BLEU)."""
    limit: int = 64
    """Most samples evaluated (the first ones in the file)."""

    def validate(self, key: str) -> None:
        require(self.limit >= 1, f"{key}.limit", f"must be >= 1, got {self.limit}")


@dataclass
class StageConfig:
    """One phase of the recipe."""

    name: str
    data: list[DatasetSpec]
    components: dict[str, Mode] = field(default_factory=dict)
    """Trainability per component; components not named are frozen."""
    lr: dict[str, float] = field(default_factory=lambda: {"default": 1e-4})
    """Peak learning rate per component; `default` for the rest."""
    steps: int | None = None
    """Optimizer steps; or give `epochs`."""
    epochs: float | None = None
    """Passes over the stage's data (mixture-weighted); converted to steps at stage start."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak LR."""
    batch_tokens: int | None = None
    """Pack samples into rows of this many tokens (media tokens counted)."""
    batch_size: int | None = None
    """Or: this many samples a micro-batch, padded to the longest."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per process)."""
    eval_every: int = 0
    """Run the recipe's evals every this many steps (0: only at the stage end)."""
    beside: str | None = None
    """The stage before this one, named to train at the same time, from the same weights, in a process
    of its own: allowed where this stage trains none of its components and its data reaches none of
    them (checked as it trains), so that the weights are the ones of training them in turn. On a CPU
    with two or more threads each stage gets half of them (a small model uses a second thread poorly),
    and this one's evals run at its end only; elsewhere they run in turn."""

    def validate(self, key: str) -> None:
        require(bool(self.data), f"{key}.data", "needs at least one dataset")
        for name, mode in self.components.items():
            require(name in COMPONENTS, f"{key}.components.{name}", f"unknown component; expected one of {COMPONENTS}")
            require(mode in ("frozen", "full", "lora"), f"{key}.components.{name}", "expected frozen, full or lora")
            require(mode != "lora" or not name.endswith("adapter"), f"{key}.components.{name}",
                   "LoRA applies to towers and the LLM; train adapters in full")
        for name, value in self.lr.items():
            require(name == "default" or name in COMPONENTS, f"{key}.lr.{name}", f"unknown component; expected {COMPONENTS}")
            require(isinstance(value, (int, float)) and value >= 0, f"{key}.lr.{name}", "must be a number >= 0")
        require((self.steps is None) != (self.epochs is None), key, "set exactly one of `steps` or `epochs`")
        require((self.batch_tokens is None) != (self.batch_size is None), key,
               "set exactly one of `batch_tokens` (packed) or `batch_size` (padded)")
        for name in ("steps", "batch_tokens", "batch_size", "grad_accum"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{key}.{name}", f"must be >= 1, got {value}")
        require(self.epochs is None or self.epochs > 0, f"{key}.epochs", f"must be > 0, got {self.epochs}")
        for name in ("warmup_steps", "eval_every"):
            require(getattr(self, name) >= 0, f"{key}.{name}", f"must be >= 0, got {getattr(self, name)}")
        require(self.steps is None or self.warmup_steps <= self.steps, f"{key}.warmup_steps",
                f"must be <= steps ({self.steps}), got {self.warmup_steps}")
        require(0 <= self.min_lr_ratio <= 1, f"{key}.min_lr_ratio", "must be within [0, 1]")

    def total_steps(self, records: int, world: int, mean_tokens: float | None) -> int | None:
        """Optimizer steps: `steps`, or `epochs` passes over a mixture of `records` samples (a packed
        row holds batch_tokens // mean_tokens of them); None if that needs `mean_tokens` and it is None."""
        if self.steps:
            return self.steps
        if self.batch_tokens and not mean_tokens:
            return None
        per_batch = max(1, self.batch_tokens // max(1, int(mean_tokens))) if self.batch_tokens else self.batch_size
        return max(1, math.ceil(self.epochs * records / (self.grad_accum * world * per_batch)))

    def mode(self, component: str) -> str:
        return self.components.get(component, "frozen")

    def lr_of(self, component: str) -> float:
        return float(self.lr.get(component, self.lr.get("default", 1e-4)))


@dataclass
class TrainConfig:
    """Settings shared by every stage."""

    out_dir: str = "runs/default"
    seed: int = 0
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to biases and norms)."""
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 turns it off."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for the forward pass (fp32 is faster on most CPUs)."""
    activation_checkpointing: bool = False
    """Recompute LLM activations in the backward pass (less memory, ~30% more compute)."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every this many steps (0: none; `--stage NAME` then restarts a
    stage from the previous stage's export)."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept (older ones deleted); stage-end exports are always kept."""
    skip_long_samples: bool = False
    """Skip (and count) samples longer than the packing budget instead of failing."""
    sample_cache_gb: float = 0.0
    """Keep encoded samples (media decoded, text tokenized) in memory across stages, up to this many
    GiB a process (0: off); pays when the data is small enough to hold and read many times over."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """How `torchrun` runs train: DDP replicas, or FSDP2 `fully_shard` per LLM layer."""
    lora: LoraSpec = field(default_factory=LoraSpec)

    def validate(self, key: str) -> None:
        require(self.checkpoint_every >= 0, f"{key}.checkpoint_every", "must be >= 0 (0: no checkpoints)")
        require(self.keep_checkpoints >= 1, f"{key}.keep_checkpoints", "must be >= 1")
        for name in ("weight_decay", "max_grad_norm", "sample_cache_gb"):
            require(getattr(self, name) >= 0, f"{key}.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass
class Recipe:
    """A model, shared training settings, stages, and evals to watch."""

    model: OmniConfig
    stages: list[StageConfig]
    train: TrainConfig = field(default_factory=TrainConfig)
    evals: list[EvalSpec] = field(default_factory=list)
    data_dir: str | None = None
    """Folder that relative data, eval, tokenizer and model-folder paths resolve against (default: the
    recipe's); absolute once loaded."""

    def missing_files(self, stages: list[StageConfig] | None = None) -> list[str]:
        """The data files of `stages` (default: all) and the eval files that are not there, each once,
        in recipe order."""
        paths = [spec.path for stage in stages or self.stages for spec in stage.data] + [e.path for e in self.evals]
        return [path for path in dict.fromkeys(paths) if not Path(path).is_file()]

    def validate(self, key: str) -> None:
        names = [s.name for s in self.stages]
        require(bool(names), f"{key}.stages" if key != "config" else "stages", "needs at least one stage")
        require(len(set(names)) == len(names), "stages", f"stage names must be unique, got {names}")
        for before, stage in zip([None, *self.stages], self.stages):
            if stage.beside is None:
                continue
            where = f"stages.{stage.name}.beside"
            require(before is not None and stage.beside == before.name, where,
                    f"must name the stage just before it ({before.name if before else 'none'}), got {stage.beside!r}")
            both = [c for c in COMPONENTS if stage.mode(c) != "frozen" and before.mode(c) != "frozen"]
            require(not both, where, f"both stages train {', '.join(both)}: beside each other, "
                                     "neither would see the other's updates")

    def stage_seed(self, stage: StageConfig) -> int:
        """The seed of `stage`'s data order and of the RNG state it starts from: the recipe's seed and
        the stage's name. The name, not the stage's place in the list: a stage inserted into or removed
        from the recipe before it then leaves its order as it was, so that a checkpoint in it resumes
        the data it was reading."""
        return zlib.crc32(f"{self.train.seed}/{stage.name}".encode())

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"--stage {name}: no such stage; the recipe has {[s.name for s in self.stages]}")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe; `model:` may name a model config file (relative to the recipe's folder).

    Relative dataset and eval paths resolve against `data_dir` (default: the recipe's folder), to
    absolute paths.
    Overrides are dotted keys into the merged document (`model.vision.max_tiles=4`,
    `train.seed=1`, `stages.0.steps=10`, `stages.3_cross_modal.lr.default=1e-4`); a relative
    `data_dir=` given as one is taken from the working directory, as paths typed on a command
    line are.
    """
    path = Path(path)
    overrides = [_data_dir_from_working_dir(o) for o in overrides]
    data = read_yaml(path, "recipe")
    model_file = path.parent / data["model"] if isinstance(data.get("model"), str) else None
    try:
        if model_file is not None:
            data["model"] = read_yaml(model_file, "model config")
        recipe = from_dict(Recipe, apply_overrides(data, overrides))
    except ConfigError as e:
        in_model_file = model_file is not None and str(e).startswith("model.") and not any(
            o.startswith("model.") for o in overrides)
        where = f"{path} (its model: {model_file})" if in_model_file else path
        raise ConfigError(f"{where}: {e}") from None
    base = _resolve(recipe.data_dir or ".", path.parent)
    recipe.data_dir = str(base)
    for spec in [d for stage in recipe.stages for d in stage.data] + recipe.evals:
        spec.path = str(_resolve(spec.path, base))
    model = recipe.model  # relative model folders too: e.g. the synthetic world's tokenizer and encoders
    for part, key in ((model.llm, "path"), (model.llm, "tokenizer"), (model.vision, "path"), (model.audio, "path")):
        value = getattr(part, key) if part is not None else None
        if value and value != "byte-level":
            setattr(part, key, str(_resolve(value, base)))
    return recipe


def _data_dir_from_working_dir(override: str) -> str:
    """`data_dir=REL` typed on a command line means REL from the working directory."""
    key, _, value = override.partition("=")
    return f"data_dir={Path(value).absolute()}" if key == "data_dir" and value.strip() else override


def _resolve(p: str | Path, base: Path) -> Path:
    """`p` against `base` (an absolute `p` as it is), as a normalised absolute path: a file reads the
    same however the recipe's path was spelled (--resume compares data paths with an export's)."""
    return Path(os.path.abspath(base / p))
