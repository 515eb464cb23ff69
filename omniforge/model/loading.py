"""Build the parts from local Hugging Face folders (or random init) and read weights offline.

Towers are built from their own config and filled with only the tensors they need, found
under whatever prefix the checkpoint stores them (`vision_model.` in a full SigLIP/CLIP,
`model.encoder.` in a Whisper checkpoint, none in an omniforge checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omniforge.errors import CheckpointError, ConfigError

WEIGHT_INDEX = "model.safetensors.index.json"


def hf_folder(path: str | Path, key: str) -> Path:
    """Check that `path` is a local Hugging Face model folder; the error names the config key."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is not a folder (only local Hugging Face folders are read)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {folder} has no config.json; expected a Hugging Face model folder")
    return folder


def hf_config(path: str | None, arch: dict[str, Any] | None, key: str):
    """The part's `transformers` config, from its folder or from the `arch` kwargs."""
    from transformers import AutoConfig

    if path is not None:
        return AutoConfig.from_pretrained(hf_folder(path, f"{key}.path"), local_files_only=True)
    arch = dict(arch)
    try:
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{key}.arch: {e}") from None


def load_llm(path: str | None, arch: dict[str, Any] | None, dtype: torch.dtype, attention: str,
             weights: bool = True) -> nn.Module:
    """Any `AutoModelForCausalLM`, from a local folder or randomly initialised from `arch`.

    attention: a `transformers` attention implementation, or `omniforge_sdpa` (SDPA that runs
    packed rows sample by sample). weights=False builds the architecture only (e.g. on the
    meta device, to count parameters).
    """
    from transformers import AutoModelForCausalLM

    from omniforge.model import attention as packed

    if attention == packed.NAME:
        packed.register()
    if path is not None and weights:
        folder = hf_folder(path, "llm.path")
        # mismatched shapes are reported in the loading info (below, by name) instead of a RuntimeError
        # that points at a log TRANSFORMERS_VERBOSITY=error hides
        llm, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True, attn_implementation=attention,
            output_loading_info=True, ignore_mismatched_sizes=True,
        )
        _check_loading_info(info, folder)
        return llm
    config = hf_config(path, arch, "llm")
    llm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    if path is None and "eos_token_id" not in arch:
        # the architecture's default id (Llama's 2) names no token of the tokenizer chosen beside it;
        # generation would stop on an ordinary token
        llm.generation_config.eos_token_id = None
    return llm


def _check_loading_info(info: dict[str, Any], folder: Path) -> None:
    """Refuse an LLM checkpoint that leaves tensors randomly initialised (missing, or of another shape)."""
    problems = [f"{name} is missing" for name in sorted(info["missing_keys"])]
    problems += [f"{name} has shape {tuple(stored)}, the configured model expects {tuple(expected)}"
                 for name, stored, expected in sorted(info["mismatched_keys"], key=lambda m: m[0])]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"llm.path: {folder} does not fit the configured LLM: {'; '.join(problems[:3])}{more}")


def build_tower(model_cls: type[nn.Module] | None, config: Any, path: str | None, dtype: torch.dtype,
                key: str, weights: bool = True) -> nn.Module:
    """Instantiate a tower from `config` and, when `path` is given, load its weights from there.

    model_cls: the class to build (None: `AutoModel`'s choice for `config`).
    """
    from transformers import AutoModel

    module = model_cls(config) if model_cls is not None else AutoModel.from_config(config)
    if path is not None and weights:
        load_weights(module, hf_folder(path, f"{key}.path"), key)
    return module.to(dtype)


def load_weights(module: nn.Module, folder: Path, key: str) -> None:
    """Fill every parameter and buffer of `module` from the checkpoint in `folder`.

    Only the tensors `module` needs are read (safetensors are memory-mapped). Raises
    `CheckpointError` naming the folder and the first missing tensors if it does not fit.
    """
    wanted = module.state_dict()
    stored = _tensor_index(folder)
    prefix = _find_prefix(wanted.keys(), stored.keys())
    if prefix is None:
        missing = [k for k in wanted if k not in stored][:3]
        raise CheckpointError(
            f"{key}: {folder} does not hold the weights of a {type(module).__name__} "
            f"(e.g. no tensor named like {missing}); is it the right kind of model?"
        )
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        by_file.setdefault(stored[prefix + name], []).append(name)
    tensors = {}
    for file, names in by_file.items():
        tensors.update(_read_tensors(folder / file, [prefix + n for n in names], prefix))
    for name, tensor in tensors.items():
        if tensor.shape != wanted[name].shape:
            raise CheckpointError(f"{key}: {folder}: tensor {prefix + name} has shape {tuple(tensor.shape)}, "
                                  f"the configured model expects {tuple(wanted[name].shape)}")
    module.load_state_dict(tensors, strict=True)


def _tensor_index(folder: Path) -> dict[str, str]:
    """Map every stored tensor name to the file that holds it."""
    if (folder / WEIGHT_INDEX).is_file():
        return dict(json.loads((folder / WEIGHT_INDEX).read_text())["weight_map"])
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors or pytorch_model.bin weights")
    index = {}
    for file in files:
        for name in _tensor_names(file):
            index[name] = file.name
    return index


def _tensor_names(file: Path) -> list[str]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    return list(torch.load(file, map_location="meta", weights_only=True).keys())


def _read_tensors(file: Path, names: list[str], prefix: str) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            return {n[len(prefix):]: f.get_tensor(n) for n in names}
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return {n[len(prefix):]: state[n] for n in names}


def _find_prefix(wanted, stored) -> str | None:
    """The prefix p with p + name stored for every wanted name (None if there is none)."""
    wanted, stored = list(wanted), set(stored)
    probe = max(wanted, key=len)  # the longest name is the least ambiguous anchor
    candidates = {s[: -len(probe)] for s in stored if s.endswith(probe)}
    for prefix in sorted(candidates, key=len):
        if all(prefix + name in stored for name in wanted):
            return prefix
    return None

