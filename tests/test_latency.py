"""The latency model (s2hk.latency) with a deterministic fake timer: the tables' fit and interpolation, the anchor
at the dense latency, the ratio's gradient, the cache, the budget; and the real timer once on a tiny model."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk.engine import TwoPathNetwork
from s2hk.latency import LatencyModel, LayerProbe, ModelProbe, LatencySettings, export_at


class Tiny(nn.Module):
    """A stem, a residual branch with a depthwise conv, and a classifier: plain, depthwise and linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.dw(y)))
        x = x + self.bn3(self.conv2(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# Fake costs are large (tens of milliseconds) so that the budget's planning, which counts what each timer call
# reports, is not swayed by the real time the build spends exporting and tracing.
FIXED_S = 0.1  # what the fake network costs besides its layers


def smooth_cost(cin: int, cout: int) -> float:
    return 1e-4 * cin * cout + 2e-3


def step_cost(cin: int, cout: int) -> float:
    """A kernel working in blocks of 8 channels: flat inside a block, a step past each multiple of 8."""
    return 1e-3 * math.ceil(cin / 8) * math.ceil(cout / 8) + 2e-3


class FakeTimer:
    """A layer costs ``cost(in, out)``; a network the sum over its convs and linears plus ``FIXED_S`` (and
    ``per_channel`` seconds per output channel of its layers, a width-dependent non-layer part). Counts calls."""

    def __init__(self, cost=smooth_cost, per_channel: float = 0.0) -> None:
        self.cost = cost
        self.per_channel = per_channel
        self.calls = 0

    def __call__(self, probe) -> float:
        self.calls += 1
        if isinstance(probe, LayerProbe):
            return self.cost(probe.in_channels, probe.out_channels)
        assert isinstance(probe, ModelProbe)
        total = FIXED_S
        for m in probe.module.modules():
            if isinstance(m, nn.Conv2d):
                total += self.cost(m.in_channels, m.out_channels) + self.per_channel * m.out_channels
            elif isinstance(m, nn.Linear):
                total += self.cost(m.in_features, m.out_features) + self.per_channel * m.out_features
        return total


@pytest.fixture
def net():
    return TwoPathNetwork(Tiny(), torch.randn(1, 3, 8, 8), granularity=1)


def build(net, timer, **kwargs):
    kwargs.setdefault("cache", False)
    return LatencyModel.build(net, torch.randn(4, 3, 8, 8), progress=False, timer=timer, **kwargs)


def widths_of(net, **by_name):
    widths = [g.channels for g in net.groups]
    for name, w in by_name.items():
        widths[net.group(name).index] = w
    return widths


def bumpy_cost(cin: int, cout: int) -> float:
    """Blocks of 8 channels and a curvature in the input width that linear interpolation cannot follow."""
    return step_cost(cin, cout) + 1e-5 * cin * cin


def test_tables_reproduce_sampled_points_and_interpolate_linearly(net):
    model = build(net, FakeTimer(bumpy_cost), budget_s=1e9)
    ins, outs, seconds = model.table("conv1")
    # conv1 (16 -> 24) and conv2 (24 -> 16) are both 1x1 convs on 8x8 inputs: one table spans both
    assert model.table("conv2") == (ins, outs, seconds)
    assert ins == outs == list(range(1, 25))  # every width: the budget allows it
    for i, cin in enumerate(ins):
        for j, cout in enumerate(outs):
            assert seconds[i][j] == bumpy_cost(cin, cout)
            assert model.layer_seconds("conv1", cin, cout) == pytest.approx(bumpy_cost(cin, cout), rel=1e-12)
    # a budget that stops at the multiples of 8 and their neighbours
    small = build(net, FakeTimer(bumpy_cost), budget_s=30.0)
    ins, outs, seconds = small.table("conv1")
    assert small.metadata["grid"] == "multiples of 8" and small.metadata["grid_reduced"]
    assert ins == outs == [1, 7, 8, 9, 15, 16, 17, 23, 24]
    for cin in ins:  # exact at every knot; a step's both sides are knots, so it stays sharp
        for cout in outs:
            assert small.layer_seconds("conv1", cin, cout) == pytest.approx(bumpy_cost(cin, cout), rel=1e-12)
    assert small.layer_seconds("conv1", 9, 8) - small.layer_seconds("conv1", 8, 8) > 1e-3
    for cin in (2, 4, 6):  # between the knots 1 and 7: the straight line through them, not the curve
        expected = bumpy_cost(1, 16) + (cin - 1) / 6 * (bumpy_cost(7, 16) - bumpy_cost(1, 16))
        assert small.layer_seconds("conv1", cin, 16) == pytest.approx(expected, rel=1e-12)
        assert abs(expected - bumpy_cost(cin, 16)) > 1e-5
    assert small.layer_seconds("conv1", 12, 20) == pytest.approx(  # bilinear inside the cell [9, 15] x [17, 23]
        sum(0.25 * bumpy_cost(a, b) for a in (9, 15) for b in (17, 23)), rel=1e-12)


def test_depthwise_table_follows_its_output_width(net):
    model = build(net, FakeTimer(), budget_s=1e9)
    ins, outs, seconds = model.table("dw")
    assert ins == [1] and outs == list(range(1, 25))
    assert seconds[0] == [smooth_cost(c, c) for c in outs]


def test_prediction_is_exact_for_an_additive_network_and_anchored_at_dense(net):
    model = build(net, FakeTimer(), budget_s=1e9)
    full = [g.channels for g in net.groups]
    timer = FakeTimer()
    assert model.dense_latency == timer(ModelProbe(export_at(net, full), ()))
    assert model.predict(full) == pytest.approx(model.dense_latency, rel=1e-12)
    assert model.coefficients["layers"] == pytest.approx(1.0, abs=1e-9)
    for by_name in ({"stem": 5, "conv1": 11}, {"stem": 16, "conv1": 3}, {"stem": 1, "conv1": 24}):
        w = widths_of(net, **by_name)
        assert model.predict(w) == pytest.approx(model.measure_at(net, w), rel=1e-9)
        assert model.ratio_at(w) == pytest.approx(model.predict(w) / model.dense_latency, rel=1e-12)


def test_dense_anchor_holds_when_the_non_layer_part_varies(net):
    """A network whose non-layer part grows with the widths: the fit finds it, and the prediction at full width
    is the measured dense latency whatever the fit."""
    model = build(net, FakeTimer(per_channel=2e-5), budget_s=1e9)
    full = [g.channels for g in net.groups]
    assert model.predict(full) == pytest.approx(model.dense_latency, rel=1e-12)
    assert model.coefficients["activations"] > 0
    w = widths_of(net, stem=6, conv1=10)
    assert model.predict(w) == pytest.approx(model.measure_at(net, w), rel=1e-3)
    without = build(net, FakeTimer(per_channel=2e-5), budget_s=1e9, calibration=())
    assert without.coefficients == {"layers": 1.0, "activations": 0.0}
    assert without.predict(full) == pytest.approx(without.dense_latency, rel=1e-12)
    assert abs(without.predict(w) - without.measure_at(net, w)) > 1e-4  # the calibration is what fits it


def test_ratio_is_differentiable_and_matches_finite_differences(net):
    model = build(net, FakeTimer(step_cost, per_channel=1e-5), budget_s=30.0)
    w = torch.tensor(widths_of(net, stem=11.3, conv1=19.6), dtype=torch.float64, requires_grad=True)
    ratio = model.ratio(w)
    assert ratio.dim() == 0 and ratio.dtype == torch.float64
    ratio.backward()
    assert w.grad[net.group("stem").index] > 0 and w.grad[net.group("conv1").index] > 0
    assert torch.autograd.gradcheck(lambda x: model.ratio(x), (w.detach().requires_grad_(),), eps=1e-4, atol=1e-7)
    # at a knot the gradient is the slope of the cell below (what a narrower width saves)
    knot = torch.tensor(widths_of(net, stem=16, conv1=24), dtype=torch.float64, requires_grad=True)
    model.ratio(knot).backward()
    below = widths_of(net, stem=15, conv1=24)
    slope = (model.ratio_at(widths_of(net, stem=16, conv1=24)) - model.ratio_at(below))
    assert knot.grad[net.group("stem").index].item() == pytest.approx(slope, rel=1e-9)


def test_skipped_layers_leave_the_prediction(net):
    """A skipped layer's table and its activations' share leave the prediction; the rest stays."""
    model = build(net, FakeTimer(per_channel=2e-5), budget_s=1e9)
    full = [g.channels for g in net.groups]
    skipped = {"conv1": (16, 24), "dw": (1, 24), "conv2": (24, 16)}  # node: (table input, output) at full width
    positions = 4 * 8 * 8  # every layer of the fake writes batch x 8 x 8 values per output channel
    saved = sum(model.coefficients["layers"] * model.layer_seconds(n, *io) +
                model.coefficients["activations"] * positions * io[1] for n, io in skipped.items())
    assert model.coefficients["activations"] > 0
    assert model.predict(full, skipped_nodes=set(skipped)) == pytest.approx(model.predict(full) - saved, rel=1e-12)


def test_cache_round_trips_and_keys_on_versions_settings_and_model(net, tmp_path, monkeypatch):
    timer = FakeTimer()
    first = build(net, timer, cache=True, cache_dir=tmp_path)
    calls = timer.calls
    assert calls > 0 and len(list(tmp_path.glob("*.json"))) == 1
    again = build(net, timer, cache=True, cache_dir=tmp_path)
    assert timer.calls == calls  # nothing measured again
    w = widths_of(net, stem=7, conv1=13)
    assert again.predict(w) == first.predict(w) and again.dense_latency == first.dense_latency
    build(net, timer, cache=True, cache_dir=tmp_path, batch_size=8)
    assert timer.calls > calls and len(list(tmp_path.glob("*.json"))) == 2
    calls = timer.calls
    build(net, timer, cache=True, cache_dir=tmp_path, mode="train")
    assert timer.calls > calls
    calls = timer.calls
    other = TwoPathNetwork(Tiny(), torch.randn(1, 3, 8, 8), granularity=2)  # another width grid
    build(other, timer, cache=True, cache_dir=tmp_path)
    assert timer.calls > calls
    calls = timer.calls
    import s2hk.latency as latency

    real_versions = latency.versions
    monkeypatch.setattr(latency, "versions", lambda: {**real_versions(), "torch": "0.0.0"})
    build(net, timer, cache=True, cache_dir=tmp_path)
    assert timer.calls > calls
    assert len(list(tmp_path.glob("*.json"))) == 5


def test_cache_folder_from_the_environment(net, tmp_path, monkeypatch):
    monkeypatch.setenv("S2HK_CACHE_DIR", str(tmp_path))
    model = build(net, FakeTimer(), cache=True)
    assert model.metadata["cache"].startswith(str(tmp_path / "latency"))
    assert len(list((tmp_path / "latency").glob("*.json"))) == 1


@pytest.mark.parametrize("damage", ["not json", "truncated", "missing table", "nan"])
def test_corrupt_cache_is_refused_and_measured_again(net, tmp_path, damage):
    timer = FakeTimer()
    first = build(net, timer, cache=True, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.json")
    text = path.read_text()
    if damage == "not json":
        path.write_text("{not json")
    elif damage == "truncated":
        path.write_text(text[: len(text) // 2])
    else:
        data = json.loads(text)
        if damage == "missing table":
            data["tables"] = data["tables"][1:]
        else:
            data["tables"][0]["seconds"][0][0] = float("nan")
        path.write_text(json.dumps(data))
    calls = timer.calls
    with pytest.warns(UserWarning, match=f"latency cache file {path} is unusable"):
        again = build(net, timer, cache=True, cache_dir=tmp_path)
    assert timer.calls > calls  # measured again, not half-loaded
    assert again.predict(widths_of(net, stem=3, conv1=5)) == first.predict(widths_of(net, stem=3, conv1=5))
    json.loads(path.read_text())  # and rewritten whole
    calls = timer.calls
    build(net, timer, cache=True, cache_dir=tmp_path)
    assert timer.calls == calls


def test_budget_reduces_the_sampling(net):
    wide, narrow, tiny = FakeTimer(step_cost), FakeTimer(step_cost), FakeTimer(step_cost)
    full = build(net, wide, budget_s=1e9)
    reduced = build(net, narrow, budget_s=30.0)
    minimal = build(net, tiny, budget_s=0.0)
    assert full.metadata["grid"] == "every width" and not full.metadata["grid_reduced"]
    assert reduced.metadata["grid_reduced"] and minimal.metadata["grid"] == "ends"
    assert minimal.metadata["points"] < reduced.metadata["points"] < full.metadata["points"]
    assert tiny.calls < narrow.calls < wide.calls


def test_measuring_stops_when_the_real_time_runs_over_the_plan(net):
    """Timer calls that turn slow after the corners (a machine that got busy): the build stops within the budget
    and uses the levels it completed, not a partial one."""
    import time

    class SlowingTimer(FakeTimer):
        def __call__(self, probe):
            if self.calls >= 25:
                time.sleep(0.005)
            return super().__call__(probe) * 1e-4  # reports tiny costs: the plan is every width

    timer = SlowingTimer()
    start = time.perf_counter()
    model = build(net, timer, budget_s=0.5)
    assert time.perf_counter() - start < 0.5 + 0.4  # the last point, the calibration and the fit
    assert model.metadata["grid"] != "every width" and model.metadata["grid_reduced"]
    assert timer.calls < 643 - 100  # a full build makes 643 calls
    ins, outs, seconds = model.table("conv1")
    assert len(seconds) == len(ins) and all(len(r) == len(outs) for r in seconds)


def test_settings_are_checked(net):
    with pytest.raises(ValueError, match="mode"):
        build(net, FakeTimer(), mode="backward")
    with pytest.raises(ValueError, match="memory_format"):
        build(net, FakeTimer(), memory_format="nhwc")
    with pytest.raises(ValueError, match="clock='cpu'"):
        LatencySettings(device="cuda", clock="cpu")
    with pytest.raises(ValueError, match="example input shapes"):
        LatencyModel.build(net, torch.randn(4, 3, 16, 16), timer=FakeTimer(), cache=False, progress=False)
    with pytest.raises(ValueError, match=r"shape \(4,\) \(all groups\), got \(5,\)"):
        build(net, FakeTimer()).ratio(torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_real_timer_runs_on_a_tiny_model(net, mode):
    """The measuring path end to end, on the CPU (no speed asserted: the machine may be shared)."""
    params = [p.clone() for p in net.model.parameters()]
    stats = [b.clone() for b in net.model.buffers()]
    model = LatencyModel.build(net, torch.randn(2, 3, 8, 8), mode=mode, budget_s=2.0, warmup=1, repeats=2,
                               calibration=(0.5,), rounds=1, cache=False, progress=False)
    assert model.settings.mode == mode and model.settings.batch_size == 2 and model.settings.device == "cpu"
    assert model.dense_latency > 0 and model.metadata["timer_calls"] > 0
    w = widths_of(net, stem=8, conv1=12)
    assert math.isfinite(model.predict(w))
    assert model.measure(export_at(net, w)) > 0
    assert all(torch.equal(a, b) for a, b in zip(params, net.model.parameters()))  # timing trained nothing
    assert all(torch.equal(a, b) for a, b in zip(stats, net.model.buffers()))
    assert all(p.grad is None for p in net.model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("mode,dtype", [("inference", torch.bfloat16), ("train", torch.float32)])
def test_real_timer_runs_on_cuda(mode, dtype):
    """The CUDA path: CUDA events, the network's device by default, the ratio on CUDA widths."""
    net = TwoPathNetwork(Tiny().cuda(), torch.randn(1, 3, 8, 8, device="cuda"), granularity=1)
    model = LatencyModel.build(net, torch.randn(2, 3, 8, 8, device="cuda"), mode=mode, budget_s=5.0, warmup=1,
                               repeats=2, calibration=(0.5,), rounds=1, cache=False, progress=False,
                               memory_format="channels_last", dtype=dtype)
    assert model.settings.device.startswith("cuda") and model.settings.clock == "wall"
    assert model.settings.cudnn_benchmark == torch.backends.cudnn.benchmark
    assert model.dense_latency > 0
    w = torch.tensor(widths_of(net, stem=8, conv1=12), dtype=torch.float64, device="cuda", requires_grad=True)
    ratio = model.ratio(w)
    ratio.backward()
    assert ratio.device.type == "cuda" and torch.isfinite(w.grad).all()
    assert model.measure(export_at(net, widths_of(net, stem=8, conv1=12))) > 0
