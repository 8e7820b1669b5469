"""LoRA adapters: which layers get them, how they start, and how they merge back."""

import pytest
import timm
import torch

from worker.engine.adapters import (attach_lora, find_target_layers, in_later_half, lora_b_matrices, merge_lora,
                                    merged_view)
from worker.engine.errors import UnsupportedModelError


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=8, patch_size=4,
                             in_chans=1, embed_dim=32, depth=2, num_heads=2).eval()


def tiny_swin() -> torch.nn.Module:
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=3, img_size=32,
                             patch_size=4, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2)).eval()


def test_qkv_of_every_vit_block_is_targeted_by_default():
    assert find_target_layers(tiny_vit(), ("qkv",)) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def test_qkv_proj_fc1_fc2_targets_every_linear_layer_of_each_block():
    layers = find_target_layers(tiny_vit(), ("qkv", "proj", "fc1", "fc2"))
    assert layers == [f"blocks.{b}.{name}" for b in (0, 1)
                      for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def test_a_dotted_target_names_the_layers_of_one_block_only():
    assert find_target_layers(tiny_vit(), ("blocks.1.attn.qkv",)) == ["blocks.1.attn.qkv"]
    assert find_target_layers(tiny_vit(), ("1.attn.qkv", "fc2")) == ["blocks.0.mlp.fc2", "blocks.1.attn.qkv",
                                                                     "blocks.1.mlp.fc2"]


def test_a_dotted_target_that_matches_no_layer_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"no linear layers named 'blocks\.7\.attn\.qkv'"):
        find_target_layers(tiny_vit(), ("qkv", "blocks.7.attn.qkv"))


def test_swin_attention_qkv_layers_are_targeted():
    assert find_target_layers(tiny_swin(), ("qkv",)) == ["layers.0.blocks.0.attn.qkv", "layers.1.blocks.0.attn.qkv"]


def test_a_model_without_qkv_layers_is_refused_with_the_layers_it_has():
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    with pytest.raises(UnsupportedModelError, match=r"ConvNeXt has no linear layers named 'qkv'; its linear layers are: head\.fc$"):
        find_target_layers(model, ("qkv",))


def test_adapters_start_as_the_original_model_and_only_they_train():
    model = tiny_vit()
    x = torch.randn(4, 1, 8, 8)
    expected = model(x)
    adapted = attach_lora(model, find_target_layers(model, ("qkv",)), rank=4)
    assert torch.equal(adapted(x), expected)  # B starts at zero
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora_b_matrices(adapted)) == 2


@pytest.mark.parametrize("build, shape", [(tiny_vit, (4, 1, 8, 8)), (tiny_swin, (4, 3, 32, 32))])
def test_merging_keeps_the_original_keys_and_reproduces_the_adapted_outputs(build, shape):
    model = build()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = attach_lora(model, find_target_layers(model, ("qkv",)), rank=8)
    with torch.no_grad():
        for b in lora_b_matrices(adapted):
            b.normal_(std=0.05)  # as if trained
    x = torch.randn(*shape)
    with torch.no_grad():
        before_merge = adapted(x)
        merged = merge_lora(adapted)
        after_merge = merged(x)
    state = merged.state_dict()
    assert state.keys() == original.keys()
    assert all(state[k].shape == original[k].shape for k in original)
    assert (after_merge - before_merge).abs().max().item() <= 1e-4
    changed = {k for k in original if not torch.equal(state[k], original[k])}
    assert changed and all(k.endswith("attn.qkv.weight") for k in changed)


def deeper_vit(depth: int) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=8, patch_size=4,
                             in_chans=1, embed_dim=16, depth=depth, num_heads=2)


@pytest.mark.parametrize(("depth", "blocks"), [(2, [1]), (5, [2, 3, 4]), (6, [3, 4, 5])])
def test_the_later_half_keeps_the_targets_of_the_later_half_of_the_blocks(depth, blocks):
    model = deeper_vit(depth)
    layers = find_target_layers(model, ("qkv", "fc2"))
    assert in_later_half(model, layers) == [f"blocks.{b}.{n}" for b in blocks for n in ("attn.qkv", "mlp.fc2")]


def test_a_model_without_a_vit_s_numbered_blocks_keeps_every_layer():
    model = tiny_swin()  # numbers its blocks per stage: there is no "later half" of them
    layers = find_target_layers(model, ("qkv",))
    assert in_later_half(model, layers) == layers


def test_the_merged_view_computes_what_merging_writes_and_leaves_the_adapters_exactly_as_they_were():
    torch.manual_seed(1)
    model = attach_lora(tiny_vit(), ["blocks.0.attn.qkv", "blocks.1.mlp.fc1"], rank=2)
    with torch.no_grad():
        for b in lora_b_matrices(model):
            b.normal_(std=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad(), merged_view(model):
        inside = model(x)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # bit for bit, base weights included
    with torch.no_grad():
        written = merge_lora(model)(x)
    assert torch.equal(inside, written)


def test_the_merged_view_of_a_model_without_adapters_is_the_model():
    model = tiny_vit()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), merged_view(model):
        assert torch.equal(model(x), tiny_vit()(x))
