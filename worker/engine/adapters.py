"""Low-rank adapters (PEFT LoRA) on a timm model's linear layers, and merging them back in."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from worker.engine.errors import UnsupportedModelError


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def find_target_layers(model: torch.nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full names of the linear layers that ``targets`` name.

    A target without a dot names a layer by its last name part, in every block: ViT and Swin
    blocks both call the query/key/value projection ``attn.qkv``; ``proj``, ``fc1`` and ``fc2`` are
    the attention output and MLP layers. A dotted target names layers by the end of their full name
    (``blocks.5.attn.qkv``: that block only). Every target must match at least one linear layer.
    """
    linears = linear_layer_names(model)
    missing = [t for t in targets if not any(_names(name, t) for name in linears)]
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no linear layers named {', '.join(map(repr, missing))}; "
            f"its linear layers are: {describe_layers(linears)}"
        )
    return [name for name in linears if any(_names(name, t) for t in targets)]


BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")  # a ViT's own blocks; Swin numbers blocks per stage


def in_later_half(model: torch.nn.Module, layers: list[str]) -> list[str]:
    """The layers inside the later half of the model's ``blocks`` (blocks 3-5 of 6, 1 of 2, 2-4 of 5).

    Forgetting a class through the later blocks alone leaves the early, generic features as they
    were; on the CIFAR-10 reference model it cost the other classes less than adapters in every
    block (benchmarks/README.md). A model without a numbered top-level ``blocks`` (Swin numbers its
    blocks per stage) has no such half: it keeps every layer, so the setting is safe as a default.
    """
    indices = {int(m[1]) for name, _ in model.named_modules() if (m := BLOCK_INDEX.match(name + "."))}
    if not indices:
        return layers
    first = (max(indices) + 1) // 2
    kept = [name for name in layers if (m := BLOCK_INDEX.match(name)) and int(m[1]) >= first]
    if not kept:
        raise UnsupportedModelError(f"none of the layers {describe_layers(layers)} lies in blocks {first} and later")
    return kept


def _names(layer: str, target: str) -> bool:
    if "." not in target:
        return layer.rsplit(".", 1)[-1] == target
    return layer == target or layer.endswith("." + target)


def describe_layers(names: list[str], limit: int = 12) -> str:
    """Layer names with block numbers folded (``blocks.*.attn.qkv``), for error messages."""
    patterns = list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in names))
    if not patterns:
        return "(none)"
    shown = ", ".join(patterns[:limit])
    return shown + (f" (+{len(patterns) - limit} more)" if len(patterns) > limit else "")


def attach_lora(model: torch.nn.Module, layers: list[str], rank: int) -> PeftModel:
    """Wrap ``model`` with LoRA on ``layers``; only the adapters are trainable.

    A is randomly initialised (PEFT's default, Kaiming-uniform, as ``LoraConfig(r=8)`` in method.md)
    and B zero-initialised (paper §3.3), so the wrapped model starts exactly as the original;
    alpha = rank makes the merged update W0 + B @ A with no extra scale.
    The caller seeds torch's global generator beforehand: PEFT draws A from it.
    """
    config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
        target_modules=layers,
    )
    return get_peft_model(model, config)


def lora_b_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if ".lora_B." in name]


def merge_lora(model: PeftModel) -> torch.nn.Module:
    """W' = W0 + B @ A in every adapted layer; returns the plain model, adapters discarded.

    Keeping A and B next to W' would let anyone compute W0 = W' - B @ A and undo the forgetting.
    """
    return model.merge_and_unload()


@contextmanager
def merged_view(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, ``model`` computes what ``merge_lora`` would write (W0 + B @ A, merged the
    same way); after it, the adapters and base weights are exactly as before (restored from a copy,
    not by subtracting B @ A again, which would not give W0 back bit for bit).

    The stop rule is judged this way: measured through the unmerged adapters (W0 x + B A x), an
    image at the boundary can be forgotten and flip back once the update is merged, and the run
    would write weights that miss the target it stopped on (seen on an AMX CPU in bf16: 1.8 % on a
    run that stopped at 0.9 %). A model without adapters is measured as it is.
    """
    if not isinstance(model, PeftModel):
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.get_base_layer().weight.copy_(weight)
