"""The shipped models: shapes, fx-traceability, recorded FLOPs, architecture facts and the registry."""
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
)
from s2hk.models.mobilenetv3 import InvertedResidual, SqueezeExcitation, make_divisible
from s2hk.models.resnet import BasicBlock, Bottleneck
from s2hk.models.wrn import WideBasicBlock

NAMES = sorted(MODELS)


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
            assert node.target not in ("view", "reshape", "add_", "mul_", "relu_"), node


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
