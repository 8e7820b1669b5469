"""A ViT's frozen front, run once per image instead of once per step.

With adapters only in the later blocks (``adapter_blocks="later-half"``), nothing before the first
adapted block changes during a run: the patch embedding and the early blocks map each forget image
to the same tokens at every step. So they run once, before training, and every step (and every
check of the forget sets) runs only the later blocks on those tokens: a smaller forward and a
backward that stops at the first adapted block. The tokens take 1-4x the memory of the images
(ViT-Tiny/4 at 32x32: 65 tokens x 192 against 3 x 32 x 32).

Only for timm's ``VisionTransformer`` itself (not subclasses, whose forward may differ), and only
when the front behaves the same in training and evaluation (no dropout, drop-path or batch norm),
so the cached tokens are exactly what a training step's forward would compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POST_BLOCK_MODULES = ("norm.", "fc_norm.", "head.", "attn_pool.", "head_drop.")


def base_network(model: torch.nn.Module) -> torch.nn.Module:
    """The timm network itself, inside PEFT's wrapper when adapters are attached."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class _ViTPart(torch.nn.Module):
    """A part of ``vit`` on either side of block ``first``; it shares the ViT's modules, copies nothing."""

    def __init__(self, vit: torch.nn.Module, first: int) -> None:
        super().__init__()
        self.vit, self.first = vit, first

    # The ViT's own mode is the part's mode, so saving and restoring it (as eval_logits does) leaves
    # the ViT as it was, never switched to training by a flag of the part's own.
    @property
    def training(self) -> bool:  # type: ignore[override]
        return self.vit.training if "vit" in self._modules else True

    @training.setter
    def training(self, mode: bool) -> None:
        pass  # train() and eval() set the ViT's flag through its children


class ViTFront(_ViTPart):
    """Images -> the tokens entering block ``first``."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for block in vit.blocks[:self.first]:
            x = block(x)
        return x


class ViTBack(_ViTPart):
    """Tokens entering block ``first`` -> logits, through the blocks that carry adapters."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        for block in vit.blocks[self.first:]:
            tokens = block(tokens)
        return vit.forward_head(vit.norm(tokens))


@dataclass(frozen=True)
class FrozenPrefix:
    front: ViTFront
    back: ViTBack


def split_frozen_prefix(model: torch.nn.Module) -> FrozenPrefix | None:
    """The model cut before its first trainable block, or None when that would change what it computes
    (not a plain timm ViT, something trainable before the blocks, a front that is random in training)."""
    from timm.models.vision_transformer import VisionTransformer

    vit = base_network(model)
    if type(vit) is not VisionTransformer:
        return None
    trainable = [name for name, p in vit.named_parameters() if p.requires_grad]
    blocks = {int(name.split(".")[1]) for name in trainable if name.startswith("blocks.")}
    if not blocks or any(not n.startswith("blocks.") and not n.startswith(POST_BLOCK_MODULES) for n in trainable):
        return None
    first = min(blocks)
    front = ViTFront(vit, first)
    if first == 0 or not _same_in_training(front):
        return None
    return FrozenPrefix(front=front, back=ViTBack(vit, first))


def _same_in_training(front: ViTFront) -> bool:
    vit = front.vit
    modules = [vit.patch_embed, vit.patch_drop, vit.norm_pre, vit.pos_drop, *vit.blocks[:front.first]]
    for module in (m for top in modules for m in top.modules()):
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            return False
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return False
        if getattr(module, "drop_prob", 0) or getattr(module, "prob", 0):  # timm DropPath, PatchDropout
            return False
    return True
