"""Data-parallel training on torch.distributed: DDP, or FSDP2 `fully_shard` for big models.

One object hides the difference between a single process and a `torchrun` launch, so the
loop reads the same either way.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    kind: str = "none"

    @classmethod
    def from_environment(cls) -> "Distributed":
        """Single process, or the process group `torchrun` describes (NCCL on GPUs, gloo on CPUs)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if world == 1:
            return cls(device=device)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if cuda else "gloo")
        return cls(rank=torch_dist.get_rank(), world=world, device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, kind: str) -> nn.Module:
        """DDP replica (per stage: it hooks the parameters that train), or FSDP2 shards (each LLM
        decoder layer, then the rest; once per run, frozen parameters stay sharded), or the model."""
        if self.world == 1:
            return model
        if self.kind == "fsdp":
            return model
        self.kind = kind
        if kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model.llm):
            fully_shard(layer)
        fully_shard(model)
        return model

    def no_sync(self, wrapped: nn.Module, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.kind == "ddp" and not last:
            return wrapped.no_sync()
        if self.kind == "fsdp":
            wrapped.set_requires_gradient_sync(last)
        return nullcontext()

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return tensor.item()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.kind != "fsdp":
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.kind != "fsdp":
            model.load_state_dict(state, strict=True)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def full_optimizer_state(self, model: nn.Module, optimizer) -> dict:
        if self.kind != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict) -> None:
        if self.kind != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def close(self) -> None:
        if self.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a HF causal LM (`model.layers` for Qwen2/Llama/Mistral)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers"):
        try:
            return list(llm.get_submodule(path))
        except AttributeError:
            continue
    raise ValueError(f"train.distributed=fsdp: cannot find the decoder layers of {type(llm).__name__}")
