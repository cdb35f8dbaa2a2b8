"""s2hk.export: the exported hard network (plain torch modules), save_pruned / load_pruned, ONNX."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk import TwoPathNetwork, count_flops, load_pruned, models, save_pruned
from helpers import randomise_norms


SIZE = 16   # 16x16 images keep wrn28_10 and resnet50 affordable on a CPU


def perturb_norms(model: nn.Module) -> nn.Module:
    """Mild random BN parameters and statistics, so that a wrongly sliced BN changes the output."""
    return randomise_norms(model, weight=(0.8, 1.2), bias=(-0.1, 0.1), mean=(-0.1, 0.1), var=(0.8, 1.25))


def sized(name: str) -> dict:
    """Constructor arguments for SIZE x SIZE inputs (the transformers' token grids are fixed at construction)."""
    return {"image_size": SIZE} if "vit" in name or "swin" in name else {}


def build(name: str, **kwargs) -> TwoPathNetwork:
    torch.manual_seed(0)
    model = perturb_norms(models.get_model(name, **{**sized(name), **kwargs}))
    return TwoPathNetwork(model, torch.randn(1, 3, SIZE, SIZE))


def prefix_channels(net: TwoPathNetwork) -> dict[str, list[int]]:
    """About half of every prunable group, as the prefix 0..k-1."""
    return {g.name: list(range(max(1, g.channels // 2))) for g in net.prunable}


def random_channels(net: TwoPathNetwork, seed: int) -> dict[str, list[int]]:
    """A random subset of random size (1..C-1) of every prunable group."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for g in net.prunable:
        k = int(torch.randint(1, g.channels, (), generator=generator))
        out[g.name] = torch.randperm(g.channels, generator=generator)[:k].tolist()
    return out


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def assert_plain_torch(module: nn.Module) -> None:
    for m in module.modules():
        owner = type(m).__module__
        # torch.nn layers and the fx-generated GraphModule class; nothing from s2hk
        assert owner.startswith("torch"), f"{type(m).__name__} from {owner}"


def assert_kept_shapes(exported: nn.Module, net: TwoPathNetwork, channels: dict[str, list[int]]) -> None:
    """Every producer of a pinned group has exactly the pinned number of output channels."""
    modules = dict(exported.named_modules())
    kept = {net.group(name).index: len(c) for name, c in channels.items()}
    for spec in net.analysis.layers.values():
        layer = modules[spec.target]
        # a channel may span several rows (an attention head spans head_dim rows of q, k and v)
        expected = sum(kept.get(seg.group, seg.size) * seg.repeat for seg in spec.out_layout)
        width = (layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
                 if isinstance(layer, nn.Linear) else layer.num_features if isinstance(layer, nn.BatchNorm2d)
                 else layer.normalized_shape[0])
        assert width == expected, (spec.target, width, expected)


def check_export(net: TwoPathNetwork, channels: dict[str, list[int]], x: torch.Tensor) -> nn.Module:
    net.set_hard_widths(channels)
    # a training-mode hard forward moves the hard path's BN statistics away from the model's own
    net.train()
    with torch.no_grad():
        net(x * 1.5 + 0.2, path="hard")
    net.eval()
    exported = net.export()
    assert not exported.training
    with torch.no_grad():
        hard = net(x, path="hard")
        out = exported(x)
    scale = hard.abs().max().item()
    assert scale > 0
    assert (out - hard).abs().max().item() <= 1e-5 * max(1.0, scale)
    assert count_flops(exported, net.example_inputs) == net.flops("hard")
    assert net.flops("hard") < net.flops("full")
    assert_plain_torch(exported)
    assert num_params(exported) < num_params(net.model)
    assert_kept_shapes(exported, net, channels)
    # module names (and so state_dict keys) are the dense model's
    # (plus the tensors torch.fx makes constants of -- buffers used outside a leaf layer, as Swin's masks -- and
    # the kept indices of constants cut to scattered channels, as a per-head position bias)
    keys = {k for k in exported.state_dict() if not k.startswith(("_tensor_constant", "s2hk_kept_"))}
    assert keys <= set(net.model.state_dict())
    return exported


@pytest.mark.parametrize("name", models.list_models())
def test_export_equals_hard_path(name):
    net = build(name)
    x = torch.randn(2, 3, SIZE, SIZE)
    check_export(net, prefix_channels(net), x)
    check_export(net, random_channels(net, seed=1), x)
    # the model itself was not changed by exporting
    assert num_params(net.model) == num_params(models.get_model(name, **sized(name)))


def test_prefix_channels_are_sliced_as_views():
    net = build("resnet56")
    net.set_hard_widths(prefix_channels(net))
    assert all(isinstance(sel, int) for sel in net.plan.selections)
    net.set_hard_widths(random_channels(net, seed=5))
    assert all(isinstance(sel, torch.Tensor) for sel in net.plan.selections)


def test_export_integer_widths_keep_the_most_important_filters():
    net = build("resnet56")
    widths = {g.name: max(1, g.channels // 3) for g in net.prunable}
    net.set_hard_widths(widths)
    exported = net.export()
    modules = dict(exported.named_modules())
    for block in ("layer1.0", "layer2.4", "layer3.8"):
        dense = net.model.get_submodule(f"{block}.conv1").weight
        importance = dense.detach().abs().flatten(1).sum(1)
        k = widths[f"{block}.conv1"]
        top = sorted(sorted(range(dense.shape[0]), key=lambda c: (-importance[c].item(), c))[:k])
        narrow = modules[f"{block}.conv1"].weight
        assert narrow.shape[0] == k
        # rows are the top-k filters, columns the kept channels of the residual stream feeding the block
        assert torch.equal(narrow, dense[top][:, narrow_columns(net, block)])
    x = torch.randn(2, 3, SIZE, SIZE)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(exported(x), net(x, path="hard"), atol=1e-5)
    assert count_flops(exported, net.example_inputs) == net.flops("hard")


def narrow_columns(net: TwoPathNetwork, block: str) -> list[int]:
    """The residual-stream channels the hard plan keeps at the input of ``block`` (by importance, by hand)."""
    stage = block.split(".")[0]
    group = net.group("conv1" if stage == "layer1" else f"{stage}.0.downsample.0")
    weights = [net.model.get_submodule(p).weight.detach() for p in group.producers]
    importance = sum(w.abs().flatten(1).sum(1) for w in weights) / len(weights)
    k = net.hard_widths()[group.name]
    return sorted(sorted(range(group.channels), key=lambda c: (-importance[c].item(), c))[:k])


def test_export_uses_hard_path_statistics():
    net = build("resnet56")
    channels = random_channels(net, seed=2)
    exported = check_export(net, channels, torch.randn(2, 3, SIZE, SIZE))
    kept = sorted(channels["layer1.0.conv1"])
    dense_bn = net.model.layer1[0].bn1
    wrapper = next(w for w in net.wrappers.values() if w.module is dense_bn)
    exported_bn = dict(exported.named_modules())["layer1.0.bn1"]
    assert exported_bn.num_features == len(kept)
    assert torch.equal(exported_bn.running_mean, wrapper.hard_running_mean[kept])
    assert torch.equal(exported_bn.running_var, wrapper.hard_running_var[kept])
    assert not torch.allclose(exported_bn.running_mean, dense_bn.running_mean[kept])
    assert torch.equal(exported_bn.weight, dense_bn.weight[kept])


def test_export_of_full_width_is_the_dense_model():
    net = build("mobilenet_v3_small")
    net.eval()
    exported = net.export()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(exported(x), net.model.eval()(x), atol=1e-6)
    assert num_params(exported) == num_params(net.model)
    assert count_flops(exported, net.example_inputs) == net.flops("full")


# --- save / load -------------------------------------------------------------------------------------


def saved(tmp_path, name: str = "resnet56", **kwargs):
    net = build(name, **kwargs)
    net.set_hard_widths(random_channels(net, seed=3))
    folder = save_pruned(net, tmp_path / "pruned", model_name=name, model_kwargs=kwargs)
    return net, folder


@pytest.mark.parametrize("name, kwargs", [("resnet56", {}), ("mobilenet_v3_small", {"num_classes": 7})])
def test_save_load_round_trip(tmp_path, name, kwargs):
    net, folder = saved(tmp_path, name, **kwargs)
    assert sorted(p.name for p in folder.iterdir()) == ["architecture.json", "model.pt"]
    exported = net.export()
    loaded = load_pruned(folder)
    assert not loaded.training
    assert_plain_torch(loaded)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), exported(x))
    assert count_flops(loaded, net.example_inputs) == net.flops("hard")
    # a plain state_dict of tensors: no class is unpickled
    state = torch.load(folder / "model.pt", weights_only=True)
    assert set(state) == set(exported.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    arch = json.loads((folder / "architecture.json").read_text())
    assert arch["flops"]["pruned"] == net.flops("hard") and arch["flops"]["dense"] == net.flops("full")
    assert arch["groups"] == {g.name: {"channels": g.channels, "kept": k}
                              for g, k in zip(net.prunable, net.plan.widths)}


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x)) + x), 2)
        return self.fc(torch.flatten(x, 1))


def test_save_load_custom_model(tmp_path):
    torch.manual_seed(0)
    net = TwoPathNetwork(perturb_norms(Custom()), torch.randn(1, 3, 8, 8))
    net.set_hard_widths({"conv1": [1, 4, 6]})
    folder = save_pruned(net, tmp_path / "custom")
    with pytest.raises(ValueError, match="names no shipped model"):
        load_pruned(folder)
    loaded = load_pruned(folder, model=Custom())
    x = torch.randn(2, 3, 8, 8)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x, path="hard"), atol=1e-6)
    assert loaded.fc.in_features == 3 * 16


def test_load_missing_files(tmp_path):
    _, folder = saved(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pruned(tmp_path / "nowhere")
    for missing in ("model.pt", "architecture.json"):
        broken = tmp_path / f"without-{missing}"
        shutil.copytree(folder, broken)
        (broken / missing).unlink()
        with pytest.raises(FileNotFoundError) as info:
            load_pruned(broken)
        assert str(broken / missing) in str(info.value)


@pytest.mark.parametrize("content, error", [
    ("{not json", "not valid JSON"),
    ('{"format": "something-else", "version": 1}', "s2hk-architecture"),
    ('{"format": "s2hk-architecture", "version": 99}', "v1"),
])
def test_load_bad_architecture_file(tmp_path, content, error):
    _, folder = saved(tmp_path)
    (folder / "architecture.json").write_text(content)
    with pytest.raises(ValueError, match=error) as info:
        load_pruned(folder)
    assert str(folder / "architecture.json") in str(info.value)


def _garbage(folder):
    (folder / "model.pt").write_bytes(b"this is not a checkpoint")


def _truncated(folder):
    data = (folder / "model.pt").read_bytes()
    (folder / "model.pt").write_bytes(data[: len(data) // 2])


def _no_layers(folder):
    arch = json.loads((folder / "architecture.json").read_text())
    del arch["layers"]
    (folder / "architecture.json").write_text(json.dumps(arch))


def _other_weights(folder):
    # a model.pt from a different pruning of the same model: shapes disagree with architecture.json
    net = build("resnet56")
    net.set_hard_widths(prefix_channels(net))
    torch.save(net.export().state_dict(), folder / "model.pt")


@pytest.mark.parametrize("corrupt", [_garbage, _truncated, _no_layers, _other_weights])
def test_load_corrupt_files_names_the_path(tmp_path, corrupt):
    _, folder = saved(tmp_path)
    corrupt(folder)
    with pytest.raises(Exception) as info:
        load_pruned(folder)
    message = str(info.value)
    assert str(folder / "model.pt") in message or str(folder / "architecture.json") in message, message


def _edit(folder, change) -> None:
    arch = json.loads((folder / "architecture.json").read_text())
    change(arch)
    (folder / "architecture.json").write_text(json.dumps(arch))


def test_flipped_byte_in_the_weights_is_refused(tmp_path):
    _, folder = saved(tmp_path)
    data = bytearray((folder / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor's data: torch.load alone would not notice
    (folder / "model.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch") as info:
        load_pruned(folder)
    assert str(folder / "model.pt") in str(info.value) and str(folder / "architecture.json") in str(info.value)


def test_weights_without_a_recorded_checksum_load_with_a_warning(tmp_path):
    _, folder = saved(tmp_path)
    arch = json.loads((folder / "architecture.json").read_text())
    assert arch["weights"]["sha256"] and arch["weights"]["file"] == "model.pt"
    _edit(folder, lambda a: a.pop("weights"))  # as written by an earlier s2hk
    with pytest.warns(RuntimeWarning, match="no checksum"):
        load_pruned(folder)


def _first(arch, key="layers"):
    return arch[key][next(iter(arch[key]))]


@pytest.mark.parametrize("change, where", [
    (lambda a: _first(a).update(kept_in_channels="0-2"), "layers['conv1'].kept_in_channels"),
    (lambda a: _first(a).update(kept_out_channels=[0, 0, 1]), "layers['conv1'].kept_out_channels"),
    (lambda a: _first(a).update(kept_out_channels=[99]), "layers['conv1'].kept_out_channels"),
    (lambda a: _first(a).pop("depthwise"), "layers['conv1'].depthwise: missing"),
    (lambda a: _first(a).update(out_channels="8"), "layers['conv1'].out_channels"),
    (lambda a: _first(a).update(dense_out_channels=32), "layers['conv1']"),
    (lambda a: _first(a).update(type="Linear"), "layers['conv1'].type"),
    (lambda a: a["layers"].update(ghost=_first(a)), "layers['ghost']: the model has no such layer"),
    (lambda a: a.update(model="resnet56"), "model: expected a JSON object"),
    (lambda a: a.update(example_input_shapes=[[1, 3, "16"]]), "example_input_shapes"),
    (lambda a: a["graph_edits"].update(skipped_blocks=[["add"]]), "graph_edits.skipped_blocks"),
    (lambda a: a.update(weights={"file": "model.pt"}), "weights"),
])
def test_malformed_architecture_entries_are_named(tmp_path, change, where):
    _, folder = saved(tmp_path)
    _edit(folder, change)
    with pytest.raises(ValueError) as info:
        load_pruned(folder)
    assert str(folder / "architecture.json") in str(info.value) and where in str(info.value), str(info.value)


def test_a_layer_entry_that_disagrees_with_the_weights_is_named(tmp_path):
    """architecture.json edited consistently with itself (one channel fewer) but not with model.pt."""
    _, folder = saved(tmp_path)
    arch = json.loads((folder / "architecture.json").read_text())
    name = next(n for n, e in arch["layers"].items() if e["kind"] == "conv" and e["out_channels"] > 1)

    def drop_a_channel(a):
        a["layers"][name]["kept_out_channels"].pop()
        a["layers"][name]["out_channels"] -= 1

    _edit(folder, drop_a_channel)
    with pytest.raises(ValueError, match=re.escape(f"'{name}.weight' has shape")) as info:
        load_pruned(folder)
    assert f"layers['{name}'] gives" in str(info.value) and str(folder / "model.pt") in str(info.value)


def _pruned_vit(tmp_path):
    net = build("vit_tiny_cifar")
    net.set_hard_widths(random_channels(net, seed=1))
    folder = save_pruned(net, tmp_path / "vit", model_name="vit_tiny_cifar", model_kwargs=sized("vit_tiny_cifar"))
    arch = json.loads((folder / "architecture.json").read_text())
    heads = arch["attention_heads"]["blocks.0.attn"]
    assert 0 < heads["heads"] < heads["dense_heads"]
    return folder, heads


def test_an_edited_head_count_is_refused(tmp_path):
    folder, heads = _pruned_vit(tmp_path)
    load_pruned(folder)
    _edit(folder, lambda a: a["attention_heads"]["blocks.0.attn"].update(heads=heads["heads"] + 1))
    with pytest.raises(ValueError, match=re.escape("attention_heads['blocks.0.attn']")) as info:
        load_pruned(folder)
    assert "graph_edits.reshapes" in str(info.value)


def test_edited_reshapes_that_do_not_run_are_refused(tmp_path):
    """Head count and reshapes edited together (consistent with each other, not with the weights)."""
    folder, heads = _pruned_vit(tmp_path)

    def more_heads(a):
        a["attention_heads"]["blocks.0.attn"]["heads"] += 1
        dims = a["graph_edits"]["reshapes"]["reshape"]  # block 0's split into (3, heads, head_dim)
        assert dims[-2:] == [heads["heads"], heads["head_dim"]]
        dims[-2] += 1

    _edit(folder, more_heads)
    with pytest.raises(ValueError, match="does not run on its example input"):
        load_pruned(folder)


# --- ONNX --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("name, dynamo", [("resnet56", False), ("mobilenet_v3_small", False), ("resnet56", True)])
def test_onnx_export(tmp_path, name, dynamo):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    net = build(name)
    channels = random_channels(net, seed=4)
    net.set_hard_widths(channels)
    exported = net.export()
    x = torch.randn(1, 3, SIZE, SIZE)
    path = tmp_path / f"{name}.onnx"
    # both exporters work; the torch.export-based one takes several seconds, so it runs on one model only
    torch.onnx.export(exported, (x,), str(path), dynamo=dynamo)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    # the pruned widths are in the graph: some (k, 3, 3, 3) weight is the stem with its kept channels
    stem = "conv1" if name == "resnet56" else "features.0.0"
    shapes = [tuple(init.dims) for init in proto.graph.initializer]
    assert (len(channels[stem]), 3, 3, 3) in shapes
    # run it with onnx's own reference interpreter (onnxruntime is not installed)
    with torch.no_grad():
        expected = exported(x).numpy()
    evaluator = ReferenceEvaluator(proto)
    got = evaluator.run(None, {evaluator.input_names[0]: x.numpy()})[0]
    assert got.shape == expected.shape == (1, 10)
    assert abs(got - expected).max() <= 1e-4 * max(1.0, abs(expected).max())
