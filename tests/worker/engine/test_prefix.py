"""The frozen front of a ViT runs once: same logits, same runs, only where that holds exactly."""

from __future__ import annotations

import timm
import torch

from tests.worker.engine.test_unlearn import held_out_accuracy, run
from worker.engine.adapters import attach_lora, find_target_layers, in_later_half
from worker.engine.package import build_model, load_package
from worker.engine.prefix import split_frozen_prefix


def vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=8, patch_size=4,
                             in_chans=1, embed_dim=32, depth=4, num_heads=2, **kwargs)


def later_half_adapters(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return attach_lora(model, in_later_half(model, find_target_layers(model, ("qkv",))), rank=4)


def test_front_then_back_is_the_whole_network_and_only_the_back_trains():
    model = later_half_adapters(vit())
    split = split_frozen_prefix(model)
    assert split is not None and split.front.first == 2
    images = torch.randn(5, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(split.back(split.front(images)), model(images))
    model.train()
    split.back(split.front(images).detach()).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_no_split_when_the_first_block_or_the_embedding_trains_or_the_front_is_random():
    every_block = vit()
    attach_lora(every_block, find_target_layers(every_block, ("qkv",)), rank=4)
    assert split_frozen_prefix(every_block) is None  # adapters in block 0: nothing frozen to run once
    full = vit()
    assert split_frozen_prefix(full) is None  # full fine-tuning: the patch embedding trains too
    assert split_frozen_prefix(later_half_adapters(vit(drop_path_rate=0.1))) is None  # random in training
    assert split_frozen_prefix(later_half_adapters(vit(proj_drop_rate=0.1))) is None
    assert split_frozen_prefix(later_half_adapters(vit(drop_path_rate=0.0))) is not None


def test_the_parts_follow_the_vit_s_mode():
    model = later_half_adapters(vit()).eval()
    split = split_frozen_prefix(model)
    assert not split.front.training and not split.back.training
    split.back.train()
    assert model.get_base_model().training and split.front.training


def test_a_run_with_the_front_cached_is_the_run_without_it(digits_model, digits):
    package = load_package(digits_model)
    split = split_frozen_prefix(later_half_adapters(build_model(package.card, package.state_dict)))
    assert split is not None and split.front.first == 2  # the digits ViT has 4 blocks: the cache is used
    settings = dict(method="lora-kl", adapter_blocks="later-half", seed=1, max_steps=30)
    cached = run(digits_model, digits, **settings)
    uncached = run(digits_model, digits, cache_frozen_prefix=False, **settings)
    assert cached.report.steps == uncached.report.steps
    # A run that trained (whether it met the target in 30 steps depends on the CPU's arithmetic).
    assert cached.report.forget_acc_after["3"] < cached.report.forget_acc_before["3"]
    for key, value in cached.state_dict.items():
        torch.testing.assert_close(value, uncached.state_dict[key], atol=1e-5, rtol=1e-4)
    assert held_out_accuracy(cached.card, cached.state_dict, digits) == \
        held_out_accuracy(uncached.card, uncached.state_dict, digits)
