"""`omniforge train --dry-run`: validate a recipe and show what each stage will train, and on how much.

Nothing is trained and no weights are read: the model is built on the meta device from the
parts' configs, so a 7B recipe is checked in seconds.
"""

from __future__ import annotations

import torch

from omniforge.data.dataset import JsonlConversations, mean_sample_tokens, open_mixture
from omniforge.errors import OmniforgeError
from omniforge.processing.chat import OmniProcessor
from omniforge.train.components import configure_stage, format_table, merge_lora
from omniforge.train.recipe import Recipe

PROBE = 32
"""Samples encoded per stage to estimate tokens per sample."""


def dry_run(recipe: Recipe, world: int = 1) -> tuple[str, list[str]]:
    """A report of every stage (component table, data, steps and token budget) and the data and eval
    files that are missing, which a run would stop on before training. Raises on a bad recipe; a model
    that cannot be built from its configs, or a missing file, is reported in the plan, which then
    goes without the counts they would give."""
    from omniforge.model.omni import OmniModel

    missing = recipe.missing_files()
    lines = [f"recipe: {len(recipe.stages)} stage(s), out_dir {recipe.train.out_dir}"]
    try:
        with torch.device("meta"):
            model = OmniModel.from_config(recipe.model, weights=False)
    except OmniforgeError as e:
        lines.append(f"model: cannot be built from its configs ({e}); parameter counts omitted")
        model = None
    processor = OmniProcessor.from_model(model) if model is not None else None
    for stage in recipe.stages:
        lines.append(f"\n== stage {stage.name}")
        if model is not None:
            lines.append(format_table(configure_stage(model, stage, recipe.train.lora)))
            merge_lora(model)  # as the loop does at a stage end: the next stage counts merged weights, not adapters
        absent = [spec.path for spec in stage.data if spec.path in missing]
        sizes = [0 if spec.path in absent else len(JsonlConversations(spec.path)) for spec in stage.data]
        for spec, size in zip(stage.data, sizes):
            lines.append(f"  data {spec.path}: " + ("MISSING" if spec.path in absent else f"{size} records")
                         + f", weight {spec.weight:g}")
        mean = (mean_sample_tokens(open_mixture(stage.data, recipe.stage_seed(stage)), processor, PROBE)
                if processor is not None and not absent else None)
        steps = stage.steps if absent else stage.total_steps(sum(sizes), world, mean)
        steps_text = f"{stage.epochs:g} epochs = " if stage.epochs else ""
        unknown = "a data file is missing" if absent else "no sample length measured"
        steps_text += f"{steps} steps" if steps else f"steps unknown ({unknown})"
        per_step = stage.grad_accum * world
        if stage.batch_tokens:
            budget = f"{stage.batch_tokens * per_step:,} tokens a step (packed)"
            total = stage.batch_tokens * per_step * (steps or 0)
        else:
            budget = f"{stage.batch_size * per_step} samples a step (padded)"
            total = stage.batch_size * per_step * (steps or 0) * (mean or 0)
        mean_text = f"; {mean:.0f} tokens a sample on average ({PROBE} probed)" if mean else ""
        lines.append(f"  {steps_text}, {budget}{mean_text}")
        if total:
            lines.append(f"  token budget: {total:,.0f} tokens")
    return "\n".join(lines), missing

