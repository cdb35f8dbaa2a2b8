"""The shipped models: shapes, fx-traceability, recorded FLOPs, architecture facts and the registry.

The transformers run at full size here too: one forward of each is well under a second on 2 CPU cores (the
parametrised tests share one eval-mode instance per model and run without autograd).
"""
from __future__ import annotations

import functools
import operator

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from s2hk.models import (
    DENSE_FLOPS_32,
    MODELS,
    get_model,
    list_models,
    mobilenet_v3_small,
    resnet18,
    resnet50,
    swin_tiny_cifar,
    vit_small_cifar,
    vit_tiny_cifar,
)
from s2hk.models.mobilenetv3 import InvertedResidual, SqueezeExcitation, make_divisible
from s2hk.models.resnet import BasicBlock, Bottleneck
from s2hk.models.swin import (
    MASK_VALUE,
    PatchMerging,
    SwinTransformerBlock,
    WindowAttention,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from s2hk.models.vit import Attention, Block
from s2hk.models.wrn import WideBasicBlock

NAMES = sorted(MODELS)
# Token models: their graphs reshape (head split/merge, windows), so the CNNs' "no view/reshape" rule is
# replaced by "the channel (last) dimension of every view/reshape is read from the input, never a constant".
TRANSFORMERS = {"vit_tiny_cifar", "vit_small_cifar", "swin_tiny_cifar"}


@functools.lru_cache(maxsize=None)
def _model(name: str, num_classes: int = 10) -> nn.Module:
    """One eval-mode instance per (name, num_classes), shared by the read-only tests below."""
    torch.manual_seed(0)
    return get_model(name, num_classes=num_classes).eval()


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


# --- shapes and tracing -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", NAMES)
def test_forward_shape(name: str, num_classes: int) -> None:
    with torch.no_grad():
        out = _model(name, num_classes)(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_matches_eager(name: str) -> None:
    model = _model(name)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
    # The graph must add residuals out of place and flatten without hard-coded sizes.
    for node in traced.graph.nodes:
        if node.op == "call_function":
            assert node.target is not operator.iadd, node
        if node.op == "call_method":
            assert node.target not in ("add_", "mul_", "relu_", "masked_fill_", "copy_"), node
            if name not in TRANSFORMERS:
                assert node.target not in ("view", "reshape"), node
            elif node.target in ("view", "reshape"):
                channels = node.args[-1]
                assert isinstance(channels, torch.fx.Node) or channels == -1, node


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_transformer_trace_is_batch_agnostic(name: str) -> None:
    traced = torch.fx.symbolic_trace(_model(name))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(traced(x), _model(name)(x))


@pytest.mark.parametrize("name", NAMES)
def test_leaves_are_standard_layers_and_not_inplace(name: str) -> None:
    model = _model(name)
    for mod_name, m in model.named_modules():
        if not list(m.children()):
            assert type(m).__module__.startswith("torch.nn.modules"), (mod_name, type(m))
        assert not getattr(m, "inplace", False), mod_name
    for m in model.modules():
        assert type(m).__bases__ == (nn.Module,) or type(m).__module__.startswith("torch.nn.modules"), type(m)


# --- recorded FLOPs ------------------------------------------------------------------------------------


def test_flops_table_covers_registry() -> None:
    assert set(DENSE_FLOPS_32) == set(MODELS)
    assert all(isinstance(v, int) and v > 0 for v in DENSE_FLOPS_32.values())


@pytest.mark.parametrize("name", NAMES)
def test_dense_flops_match_measurement(name: str) -> None:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        _model(name)(torch.randn(1, 3, 32, 32))
    assert DENSE_FLOPS_32[name] == counter.get_total_flops()


# --- ResNets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctor", [resnet18, resnet50])
def test_resnet_imagenet_stem(ctor) -> None:
    model = ctor(num_classes=10, stem="imagenet").eval()
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    traced = torch.fx.symbolic_trace(model)
    assert any(n.op == "call_module" and n.target == "maxpool" for n in traced.graph.nodes)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_cifar_stem(name: str) -> None:
    model = _model(name)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert _count(model, nn.MaxPool2d) == 0


def test_resnet_unknown_stem() -> None:
    with pytest.raises(ValueError, match="imagenet"):
        resnet18(stem="tiny")


def test_resnet18_structure() -> None:
    model = _model("resnet18")
    assert _count(model, BasicBlock) == 8
    # stem + 2 convs per block + projections entering layer2..layer4
    assert len(_convs(model)) == 1 + 8 * 2 + 3
    assert model.fc.in_features == 512


def test_resnet50_structure() -> None:
    model = _model("resnet50")
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert _count(model, Bottleneck) == 16
    # stem + 3 convs per block + a projection at the start of every stage (64 -> 256 changes width too)
    assert len(_convs(model)) == 1 + 16 * 3 + 4
    assert model.fc.in_features == 2048
    assert model.layer2[0].conv2.stride == (2, 2)  # stride on the 3x3, as torchvision


def test_resnet56_structure() -> None:
    model = _model("resnet56")
    assert not hasattr(model, "layer4")
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 27
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 4)] == [9, 9, 9]
    projections = [b.downsample for b in blocks if b.downsample is not None]
    assert projections == [model.layer2[0].downsample, model.layer3[0].downsample]
    for proj in projections:
        assert isinstance(proj[0], nn.Conv2d) and proj[0].kernel_size == (1, 1)
        assert isinstance(proj[1], nn.BatchNorm2d)
    # 54 convs in blocks + 1 stem + 2 projection shortcuts; 55 weighted layers + fc = the "56"
    assert len(_convs(model)) == 54 + 1 + 2
    assert {b.conv2.out_channels for b in blocks} == {16, 32, 64}
    assert model.conv1.out_channels == 16 and model.fc.in_features == 64


# --- WideResNet ----------------------------------------------------------------------------------------


def test_wrn28_10_structure() -> None:
    model = _model("wrn28_10")
    blocks = [m for m in model.modules() if isinstance(m, WideBasicBlock)]
    assert len(blocks) == 12
    assert [b.conv2.out_channels for b in blocks] == [160] * 4 + [320] * 4 + [640] * 4
    with_shortcut = [b for b in blocks if b.shortcut is not None]
    assert with_shortcut == [model.block1[0], model.block2[0], model.block3[0]]
    assert all(b.shortcut.kernel_size == (1, 1) for b in with_shortcut)
    # stem + 2 convs per block + 3 shortcuts; 25 convs + fc = depth 28 minus the 3 shortcuts
    assert len(_convs(model)) == 1 + 24 + 3
    assert model.conv1.out_channels == 16 and model.fc.in_features == 640
    # pre-activation: the block's first BN normalises its input
    assert blocks[0].bn1.num_features == 16 and blocks[4].bn1.num_features == 160


def test_wrn_dropout_argument() -> None:
    model = get_model("wrn28_10", dropout=0.3)
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.3}


# --- MobileNetV3 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, blocks, se_blocks, last_conv, hidden",
    [("mobilenet_v3_small", 11, 9, 576, 1024), ("mobilenet_v3_large", 15, 8, 960, 1280)],
)
def test_mobilenet_structure(name: str, blocks: int, se_blocks: int, last_conv: int, hidden: int) -> None:
    model = _model(name)
    assert _count(model, InvertedResidual) == blocks
    assert model.features[0][0].stride == (1, 1)  # CIFAR stem by default

    depthwise = [c for c in _convs(model) if c.groups > 1]
    assert len(depthwise) == blocks
    for conv in depthwise:
        assert conv.groups == conv.in_channels == conv.out_channels

    ses = [m for m in model.modules() if isinstance(m, SqueezeExcitation)]
    assert len(ses) == se_blocks
    for se in ses:
        assert se.fc1.bias is not None and se.fc2.bias is not None
        assert se.fc1.out_channels == make_divisible(se.fc1.in_channels // 4, 8)
        assert isinstance(se.scale_activation, nn.Hardsigmoid)

    assert model.features[-1][0].out_channels == last_conv
    assert isinstance(model.features[-1][2], nn.Hardswish)
    linear1, act, drop, linear2 = model.classifier
    assert isinstance(act, nn.Hardswish) and isinstance(drop, nn.Dropout) and drop.p == 0.2
    assert (linear1.in_features, linear1.out_features, linear2.in_features) == (last_conv, hidden, hidden)


def test_mobilenet_imagenet_stem_and_width() -> None:
    model = mobilenet_v3_small(num_classes=7, stem_stride=2, width_mult=0.5).eval()
    assert model.features[0][0].stride == (2, 2)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    with pytest.raises(ValueError, match="stem_stride"):
        mobilenet_v3_small(stem_stride=4)


# --- initialisation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet56", "mobilenet_v3_small"])
def test_initialisation(name: str) -> None:
    model = _model(name)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            assert torch.all(m.bias == 0)
    conv = max(_convs(model), key=lambda c: c.weight.numel())
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.1)
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)][0]
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1)


# --- Vision Transformers ------------------------------------------------------------------------------


def _vit_params(dim: int, depth: int, tokens: int, patch: int = 4, classes: int = 10, hidden_ratio: int = 4) -> int:
    hidden = hidden_ratio * dim
    embed = 3 * patch * patch * dim + dim + dim + tokens * dim  # conv, its bias, cls token, pos embed
    block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * hidden + hidden) + (hidden * dim + dim)
    return embed + depth * block + 2 * dim + dim * classes + classes


@pytest.mark.parametrize("name, dim, heads", [("vit_tiny_cifar", 192, 3), ("vit_small_cifar", 384, 6)])
def test_vit_structure(name: str, dim: int, heads: int) -> None:
    model = _model(name)
    assert model.patch_embed.proj.kernel_size == (4, 4) and model.patch_embed.proj.stride == (4, 4)
    assert model.patch_embed.num_patches == 64 and model.num_tokens == 65
    assert model.cls_token.shape == (1, 1, dim) and model.pos_embed.shape == (1, 65, dim)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert len(blocks) == 12
    for block in blocks:
        assert block.attn.num_heads == heads and block.attn.head_dim == 64
        assert block.attn.scale == pytest.approx(64**-0.5)
        assert (block.attn.qkv.in_features, block.attn.qkv.out_features) == (dim, 3 * dim)
        assert block.attn.qkv.bias is not None
        assert (block.mlp.fc1.out_features, block.mlp.fc2.in_features) == (4 * dim, 4 * dim)
        assert isinstance(block.mlp.act, nn.GELU)
    assert model.head.in_features == dim and model.norm.normalized_shape == (dim,)
    assert sum(p.numel() for p in model.parameters()) == _vit_params(dim, 12, 65)
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 65, dim)


def test_vit_param_counts() -> None:
    assert sum(p.numel() for p in _model("vit_tiny_cifar").parameters()) == 5_362_762
    assert sum(p.numel() for p in _model("vit_small_cifar").parameters()) == 21_342_346


def test_vit_attention_matches_sdpa() -> None:
    torch.manual_seed(0)
    attn = Attention(48, num_heads=4).eval()
    x = torch.randn(2, 7, 48)
    q, k, v = attn.qkv(x).view(2, 7, 3, 4, 12).permute(2, 0, 3, 1, 4)
    expected = attn.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
    with torch.no_grad():
        assert torch.allclose(attn(x), expected, atol=1e-5)


def test_vit_classifies_from_the_class_token() -> None:
    model = _model("vit_tiny_cifar")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert torch.allclose(model(x), model.head(tokens[:, 0]))


def test_vit_options_and_errors() -> None:
    model = vit_tiny_cifar(num_classes=5, patch_size=8, depth=2, drop_rate=0.1).eval()
    assert model.num_tokens == 17
    attn_drops = {id(b.attn.attn_drop) for b in model.blocks}
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout) and id(m) not in attn_drops} == {0.1}
    assert {b.attn.attn_drop.p for b in model.blocks} == {0.0}  # attn_drop_rate, separate
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="patch_size"):
        vit_tiny_cifar(patch_size=5)
    with pytest.raises(ValueError, match="num_heads"):
        vit_small_cifar(num_heads=5)


def test_transformer_initialisation() -> None:
    for name in sorted(TRANSFORMERS):
        model = _model(name)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                assert torch.all(m.bias == 0)
        linear = max((m for m in model.modules() if isinstance(m, nn.Linear)), key=lambda m: m.weight.numel())
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
    vit = _model("vit_small_cifar")
    assert vit.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert vit.cls_token.abs().max().item() > 0


# --- Swin Transformer ----------------------------------------------------------------------------------


def _swin_params(dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), windows=(4, 4, 4, 2), classes=10) -> int:
    total = 3 * 2 * 2 * dim + dim + 2 * dim  # patch conv + bias + patch norm
    for i, (depth, h, w) in enumerate(zip(depths, heads, windows)):
        c = dim * 2**i
        block = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + (2 * w - 1) ** 2 * h + (4 * c * c + 4 * c) + (4 * c * c + c)
        total += depth * block
        if i < len(depths) - 1:
            total += 2 * 4 * c + 4 * c * 2 * c  # merging norm + bias-free reduction
    c = dim * 2 ** (len(depths) - 1)
    return total + 2 * c + c * classes + classes


def test_swin_structure() -> None:
    model = _model("swin_tiny_cifar")
    assert model.patch_embed.proj.kernel_size == (2, 2) and model.patch_embed.proj.stride == (2, 2)
    assert isinstance(model.patch_embed.norm, nn.LayerNorm)
    assert [len(stage.blocks) for stage in model.stages] == [2, 2, 6, 2]
    assert [stage.dim for stage in model.stages] == [96, 192, 384, 768]
    assert [stage.resolution for stage in model.stages] == [16, 8, 4, 2]
    assert [stage.downsample is not None for stage in model.stages] == [True, True, True, False]
    blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
    assert [b.attn.num_heads for b in blocks] == [3] * 2 + [6] * 2 + [12] * 6 + [24] * 2
    assert {b.attn.head_dim for b in blocks} == {32}
    # stages 1-2: windows of 4 alternating shift 0 / 2; stage 3 (4x4 map) one 4x4 window; stage 4 one 2x2 window
    assert [b.window_size for b in blocks] == [4] * 10 + [2] * 2
    assert [b.shift_size for b in blocks] == [0, 2, 0, 2] + [0] * 8
    assert [b.num_windows for b in blocks] == [16] * 2 + [4] * 2 + [1] * 8
    merges = [m for m in model.modules() if isinstance(m, PatchMerging)]
    shapes = [(m.reduction.in_features, m.reduction.out_features) for m in merges]
    assert shapes == [(384, 192), (768, 384), (1536, 768)]
    assert all(m.reduction.bias is None and m.norm.normalized_shape == (4 * m.dim,) for m in merges)
    assert model.num_features == 768 and model.head.in_features == 768
    assert sum(p.numel() for p in model.parameters()) == _swin_params() == 27_505_108
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model.patch_embed(x).shape == (1, 256, 96)
        assert model.forward_features(x).shape == (1, 4, 768)
        assert torch.allclose(model(x), model.head(model.forward_features(x).mean(dim=1)))


def test_swin_relative_position_index() -> None:
    for w in (2, 4, 7):
        index = relative_position_index(w)
        n, size = w * w, (2 * w - 1) ** 2
        assert index.shape == (n, n) and index.dtype == torch.int64
        assert index.min().item() >= 0 and index.max().item() < size
        assert set(index.flatten().tolist()) == set(range(size))  # every offset of the table is reachable
        centre = (w - 1) * (2 * w - 1) + (w - 1)
        assert torch.all(index.diagonal() == centre)  # zero offset
        assert torch.all(index + index.T == 2 * centre)  # offset j - i is minus offset i - j
        for i in range(n):
            for j in range(n):
                dy, dx = i // w - j // w, i % w - j % w
                assert index[i, j].item() == (dy + w - 1) * (2 * w - 1) + (dx + w - 1)
    for block in _model("swin_tiny_cifar").modules():
        if isinstance(block, WindowAttention):
            w = block.window_size
            assert block.relative_position_bias_table.shape == ((2 * w - 1) ** 2, block.num_heads)
            assert torch.equal(block.relative_position_index, relative_position_index(w))
            assert "relative_position_index" in dict(block.named_buffers())


def test_swin_attention_masks() -> None:
    blocks = [m for m in _model("swin_tiny_cifar").modules() if isinstance(m, SwinTransformerBlock)]
    for block in blocks:
        n = block.window_size**2
        assert block.attn_mask.shape == (block.num_windows, n, n)
        if block.shift_size == 0:
            assert torch.all(block.attn_mask == 0)
            continue
        mask, res, ws, s = block.attn_mask, block.resolution, block.window_size, block.shift_size
        assert set(mask.unique().tolist()) == {0.0, MASK_VALUE} and MASK_VALUE <= -100
        # A token of the rolled map at (i, j) wrapped around if it came from the last s rows / columns; two
        # tokens of one window may attend to each other iff they wrapped the same way on both axes.
        per_row = res // ws
        for i1 in range(res):
            for j1 in range(res):
                window = (i1 // ws) * per_row + j1 // ws
                p = (i1 % ws) * ws + j1 % ws
                for i2 in range((i1 // ws) * ws, (i1 // ws + 1) * ws):
                    for j2 in range((j1 // ws) * ws, (j1 // ws + 1) * ws):
                        q = (i2 % ws) * ws + j2 % ws
                        same = (i1 >= res - s) == (i2 >= res - s) and (j1 >= res - s) == (j2 >= res - s)
                        assert mask[window, p, q].item() == (0.0 if same else MASK_VALUE), (block, window, p, q)
        # interior windows are unmasked; the bottom-right window mixes four regions
        assert torch.all(mask[0] == 0)
        assert (mask[-1] == MASK_VALUE).sum().item() == n * n - 4 * (n // 4) ** 2
    assert torch.all(shifted_window_mask(8, 4, 0) == 0)


def test_swin_shifted_window_does_not_attend_across_the_wrap() -> None:
    # Image corners (0, 0) and (H-1, W-1) share the bottom-right window after the cyclic shift; the mask must
    # keep them apart, so perturbing one leaves the other's output unchanged -- and without the mask it would not.
    torch.manual_seed(0)
    block = SwinTransformerBlock(32, resolution=8, num_heads=2, window_size=4, shift_size=2).eval()
    x = torch.randn(1, 64, 32)
    y = x.clone()
    y[:, 0] += torch.randn(32)  # not a constant: LayerNorm would cancel that
    with torch.no_grad():
        assert torch.allclose(block(x)[:, 63], block(y)[:, 63], atol=1e-6)
        assert not torch.allclose(block(x)[:, 1], block(y)[:, 1], atol=1e-4)  # same window, same region
        block.attn_mask.zero_()
        assert not torch.allclose(block(x)[:, 63], block(y)[:, 63], atol=1e-4)


def test_swin_window_partition_round_trip() -> None:
    x = torch.arange(2 * 8 * 8 * 3, dtype=torch.float32).view(2, 8, 8, 3)
    windows = window_partition(x, 4, 8, 8)
    assert windows.shape == (2 * 4, 16, 3)
    assert torch.equal(windows[1], x[0, 0:4, 4:8].reshape(16, 3))  # second window: top row, right half
    assert torch.equal(window_reverse(windows, 4, 8, 8), x)


def test_swin_options_and_errors() -> None:
    model = swin_tiny_cifar(num_classes=4, depths=(2, 2), num_heads=(2, 4), embed_dim=32).eval()
    assert model.num_features == 64
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="window_size"):
        swin_tiny_cifar(window_size=3)
    with pytest.raises(ValueError, match="num_heads"):
        swin_tiny_cifar(num_heads=(5, 6, 12, 24))
    with pytest.raises(ValueError, match="depths"):
        swin_tiny_cifar(depths=(2, 2, 6))
    with pytest.raises(ValueError, match="patch_size"):
        swin_tiny_cifar(patch_size=3)
    with pytest.raises(ValueError, match="depths"):
        swin_tiny_cifar(image_size=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


# --- registry ------------------------------------------------------------------------------------------


def test_list_models() -> None:
    assert list_models() == NAMES
    assert set(NAMES) == {
        "resnet18",
        "resnet50",
        "resnet56",
        "wrn28_10",
        "mobilenet_v3_small",
        "mobilenet_v3_large",
        "vit_tiny_cifar",
        "vit_small_cifar",
        "swin_tiny_cifar",
    }


def test_get_model_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError) as info:
        get_model("resnet1000")
    message = str(info.value)
    assert "resnet1000" in message
    for name in NAMES:
        assert name in message


def test_get_model_forwards_kwargs() -> None:
    model = get_model("resnet18", num_classes=3, stem="imagenet")
    assert model.fc.out_features == 3 and isinstance(model.maxpool, nn.MaxPool2d)
