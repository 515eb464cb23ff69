"""Trainability per component: freezing, LoRA, optimizer groups, and the stage table.

A parameter belongs to the component whose module path is the longest prefix of its name
(`vision_adapter.0.weight` -> vision_adapter, `vision.tower...` -> vision_tower), so a part
nested inside another would still be its own component.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from omniforge.errors import ConfigError
from omniforge.train.recipe import COMPONENTS, MODULE_OF, LoraSpec, StageConfig

PREFIXES = sorted(((MODULE_OF[c] + ".", c) for c in COMPONENTS), key=lambda p: -len(p[0]))


def component_of(parameter_name: str) -> str:
    """The component a parameter of `OmniModel` belongs to, by module path."""
    for prefix, component in PREFIXES:
        if parameter_name.startswith(prefix):
            return component
    raise KeyError(f"parameter {parameter_name!r} belongs to no component")


@dataclass
class ComponentRow:
    component: str
    mode: str
    params: int
    trainable: int
    lr: float


def check_stage_parts(model: nn.Module, stage: StageConfig) -> None:
    """Raise ConfigError where `stage` would train nothing it names: a component the model lacks,
    or every component frozen (checked for every stage before a run trains any)."""
    present = [c for c in COMPONENTS if getattr(model, MODULE_OF[c]) is not None]
    for component in COMPONENTS:
        if stage.mode(component) != "frozen" and component not in present:
            raise ConfigError(f"stages.{stage.name}.components.{component}: {stage.mode(component)}, but the model "
                              f"has no {component} (its config has no {component.split('_')[0]} part)")
    if all(stage.mode(c) == "frozen" for c in present):
        raise ConfigError(f"stages.{stage.name}.components: nothing to train (every component is frozen); "
                          "name one as full or lora")


def configure_stage(model: nn.Module, stage: StageConfig, lora: LoraSpec) -> list[ComponentRow]:
    """Set requires_grad per component (injecting LoRA where asked); one row per component.
    Raises as `check_stage_parts`."""
    check_stage_parts(model, stage)
    for component in COMPONENTS:
        module = getattr(model, MODULE_OF[component])
        if module is not None and stage.mode(component) == "lora":
            _inject_lora(module, lora)
    for name, parameter in model.named_parameters():
        mode = stage.mode(component_of(name))
        parameter.requires_grad = mode == "full" or (mode == "lora" and "lora_" in name)
    rows = []
    for component in COMPONENTS:
        module = getattr(model, MODULE_OF[component])
        if module is None:
            continue
        params = [p for n, p in module.named_parameters() if "lora_" not in n]
        rows.append(ComponentRow(component, stage.mode(component), sum(p.numel() for p in params),
                                 sum(p.numel() for p in module.parameters() if p.requires_grad), stage.lr_of(component)))
    return rows


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight and remove the LoRA layers; returns how many."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
            merged += 1
    return merged


def param_groups(model: nn.Module, stage: StageConfig, weight_decay: float) -> list[dict]:
    """AdamW groups: per component, with and without weight decay (none on biases and norms)."""
    groups: dict[tuple[str, bool], list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            decay = parameter.ndim >= 2 and "lora_" not in name
            groups.setdefault((component_of(name), decay), []).append(parameter)
    return [{"params": params, "lr": stage.lr_of(component), "weight_decay": weight_decay if decay else 0.0,
             "component": component} for (component, decay), params in groups.items()]


def format_table(rows: list[ComponentRow]) -> str:
    lines = [f"  {'component':15s} {'mode':7s} {'params':>12s} {'trainable':>12s} {'lr':>9s}"]
    for r in rows:
        lr = f"{r.lr:.1e}" if r.trainable else "-"
        lines.append(f"  {r.component:15s} {r.mode:7s} {r.params:12,d} {r.trainable:12,d} {lr:>9s}")
    total, trainable = sum(r.params for r in rows), sum(r.trainable for r in rows)
    lines.append(f"  {'total':15s} {'':7s} {total:12,d} {trainable:12,d}")
    return "\n".join(lines)


def _inject_lora(module: nn.Module, spec: LoraSpec) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    if any("lora_" in n for n, _ in module.named_parameters()):
        return  # already injected (resuming inside a LoRA stage)
    targets = [name for name, child in module.named_modules()
               if isinstance(child, nn.Linear) and not name.endswith("lm_head")]
    inject_adapter_in_model(LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                       target_modules=targets), module)
