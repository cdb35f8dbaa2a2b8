"""The engine with BatchNorm on the fused Triton kernel (op "bn_gate_act") against the PyTorch composition.

Runs under Triton's CPU interpreter when there is no GPU (tests/conftest.py sets TRITON_INTERPRET=1), on the
tensors' device otherwise. The Triton request names the op (``use_impl("triton", ops=("bn_gate_act",))``), so
that BatchNorm alone changes implementation; one test also makes the request for every op (``S2HK_IMPL=triton``),
which leaves the ops without a Triton kernel (gates, group importance, KD) to their usual choice.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("triton")

from s2hk import S2HPruner, TwoPathNetwork, dispatch, layers  # noqa: E402
from s2hk.kernels import _common  # noqa: E402
from s2hk.kernels import bn_gate_act as bga  # noqa: E402
from helpers import ResidualNet, randomise_norms

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OP = "bn_gate_act"
TOL = dict(rtol=1e-4, atol=1e-5)


pytestmark = pytest.mark.usefixtures("full_float32", "clean_env")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every call of the fused kernel's entry point, as the training flag it was given."""
    calls = []
    original = bga.bn_gate_act

    def spy(*args, **kwargs):
        calls.append(kwargs["training"])
        return original(*args, **kwargs)

    monkeypatch.setattr(bga, "bn_gate_act", spy)
    return calls


def triton_bn():
    return dispatch.use_impl("triton", ops=(OP,))


def make_model() -> ResidualNet:
    torch.manual_seed(1)
    return randomise_norms(ResidualNet(width=8, inner=6, num_classes=5)).to(DEVICE)


X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(2)).to(DEVICE)
Y = torch.randint(0, 5, (6,), generator=torch.Generator().manual_seed(3)).to(DEVICE)


def make_net() -> TwoPathNetwork:
    net = TwoPathNetwork(make_model(), X[:1], granularity=1)
    # drawn on the CPU, where the generator lives, whatever the device
    logits = torch.empty(net.mask_logits.shape).uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        net.mask_logits.copy_(logits)
    # a scattered kept set (gathered statistics, written back) and a prefix (views of the buffers)
    net.set_hard_widths({"stem": [0, 2, 3, 5, 7], "conv1": 4})
    return net


def state(net: TwoPathNetwork) -> dict:
    """Every parameter, gradient and buffer (the hard-path statistics included), by name."""
    out = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for name, p in net.named_parameters():
        if p.grad is not None:
            out[f"{name}.grad"] = p.grad.detach().clone()
    return out


def assert_same_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if want[key].is_floating_point():
            torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(got[key], want[key]), key


# --- forward and backward of each path -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["soft", "hard", "dense"])
@pytest.mark.parametrize("train", [True, False])
def test_paths_match_the_composition(path, train, kernel_calls):
    ref, fused = make_net(), make_net()
    results = []
    for net, impl in ((ref, dispatch.use_impl("reference", ops=(OP,))), (fused, triton_bn())):
        net.train(train)
        with impl:
            out = net(X, path=path)
            (out * torch.linspace(-1.0, 1.0, out.numel(), device=DEVICE).view_as(out)).sum().backward()
        results.append((out.detach(), state(net)))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    assert_same_state(results[1][1], results[0][1])
    if path == "soft":
        assert fused.mask_logits.grad.abs().sum() > 0
    # soft and hard: the three BatchNorms ran the kernel (batch statistics when training); dense: nn.BatchNorm
    assert kernel_calls == ([] if path == "dense" else [train] * 3)


def test_auto_and_cpp_requests_run_the_composition(kernel_calls):
    net = make_net()
    assert dispatch.TRITON_WINS == {}  # no GPU measurement yet: auto keeps the composition everywhere
    for impl in ("auto", "cpp", "reference"):
        with dispatch.use_impl(impl, ops=(OP,)):
            net(X, path="soft").sum().backward()
            net(X, path="hard")
    assert kernel_calls == []


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_variants(affine, track, momentum):
    """Every nn.BatchNorm configuration the wrappers meet, trained then evaluated, with and without a gate."""
    outs = {}
    for impl in ("reference", "triton"):
        torch.manual_seed(5)
        m = nn.BatchNorm2d(4, affine=affine, track_running_stats=track, momentum=momentum).to(DEVICE)
        if affine:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        gate = torch.rand(4, device=DEVICE, requires_grad=True)
        x = (torch.randn(3, 4, 5, 5, device=DEVICE) * 2 + 1).requires_grad_()
        upstream = torch.randn(3, 4, 5, 5, device=DEVICE)
        got = []
        with dispatch.use_impl(impl, ops=(OP,)):
            for training in (True, True, False):
                m.train(training)
                for g in (gate, None):
                    y = layers._batch_norm(m, x, m.running_mean, m.running_var, m.num_batches_tracked,
                                           m.weight, m.bias, g)
                    params = [p for p in (x, gate if g is not None else None, m.weight, m.bias) if p is not None]
                    got += [y.detach(), *torch.autograd.grad((y * upstream).sum(), params)]
        outs[impl] = got + [b.clone() for b in m.buffers()]
    assert len(outs["triton"]) == len(outs["reference"])
    for g, w in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(g, w, **TOL)


# --- training ------------------------------------------------------------------------------------------


def trajectory(impl, steps: int = 5):
    torch.manual_seed(6)
    pruner = S2HPruner(make_model(), X[:1], target_flops=0.5, granularity=1)
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.05, momentum=0.9)
    history = []
    with dispatch.use_impl("reference"), impl:
        for step in range(steps):
            metrics = pruner.train_step(X, Y, opt)
            history.append(({k: v for k, v in metrics.items() if v == v}, list(pruner.plan.widths),
                            pruner.mask_logits.detach().clone()))
    return pruner, history


@pytest.mark.parametrize("request_kind", ["named", "every_op"])
def test_train_step_trajectory_matches_the_composition(kernel_calls, request_kind):
    ref, ref_history = trajectory(dispatch.use_impl("reference", ops=(OP,)))
    assert kernel_calls == []
    # S2HK_IMPL=triton for every op runs Triton where s2hk has a kernel and the usual choice elsewhere
    fused, history = trajectory(triton_bn() if request_kind == "named" else dispatch.use_impl("triton"))
    assert len(kernel_calls) == 5 * 2 * 3  # soft and hard forward of three BatchNorms per step
    assert any(w < c for w, c in zip(ref_history[-1][1], [8, 6]))  # the hard network got narrower
    for (metrics, widths, logits), (ref_metrics, ref_widths, ref_logits) in zip(history, ref_history):
        assert widths == ref_widths
        assert metrics.keys() == ref_metrics.keys()
        for key, value in ref_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        torch.testing.assert_close(logits, ref_logits, **TOL)
    assert_same_state({k: v for k, v in state(fused).items() if not k.endswith(".grad")},
                      {k: v for k, v in state(ref).items() if not k.endswith(".grad")})


def test_recalibrate_bn_matches_the_composition(kernel_calls):
    batches = [(X[i:i + 3], Y[i:i + 3]) for i in (0, 3, 1)]
    results = []
    for impl in (dispatch.use_impl("reference", ops=(OP,)), triton_bn()):
        net = S2HPruner(make_model(), X[:1], target_flops=0.5, granularity=1)
        net.set_hard_widths({"stem": [1, 2, 4, 6, 7], "conv1": 3})
        net.eval()
        with impl:
            assert net.recalibrate_bn(batches) == 3
        assert not net.training
        assert all(w.module.momentum == 0.1 for w in net.wrappers.values() if isinstance(w, layers.GatedNorm))
        results.append(state(net))
    assert kernel_calls == [True] * 18  # 3 batches x (soft, hard) x 3 norms, each normalising with its batch
    assert_same_state(results[1], results[0])
    # the cumulative average of three batches: the mean of the three batch means on a kept channel
    bn0 = [w for w in net.wrappers.values() if isinstance(w, layers.GatedNorm) and w.module is net.model.bn0][0]
    kept = torch.tensor([1, 2, 4, 6, 7], device=DEVICE)
    with torch.no_grad():
        h = [F.conv2d(x, net.model.stem.weight[kept], padding=1).mean((0, 2, 3)) for x, _ in batches]
    torch.testing.assert_close(bn0.hard_running_mean[kept], sum(h) / 3, **TOL)
    assert int(bn0.hard_num_batches_tracked) == 3


# --- dispatch ------------------------------------------------------------------------------------------


def test_forcing_triton_without_triton_names_the_op(monkeypatch):
    net = make_net()
    monkeypatch.setattr(dispatch.importlib.util, "find_spec", lambda name: None)
    with triton_bn(), pytest.raises(dispatch.ImplementationUnavailable) as err:
        net(X, path="hard")
    message = str(err.value)
    assert "'bn_gate_act'" in message and "triton is not installed" in message
    # the environment variable asks the same
    monkeypatch.setenv("S2HK_IMPL", "bn_gate_act=triton")
    with pytest.raises(dispatch.ImplementationUnavailable, match="'bn_gate_act'.*triton is not installed"):
        net(X, path="soft")
    # auto falls back quietly
    monkeypatch.setenv("S2HK_IMPL", "auto")
    net(X, path="soft")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="simulates a CPU process without Triton's interpreter")
def test_forcing_triton_on_cpu_without_the_interpreter_names_the_op(monkeypatch):
    net = make_net()
    monkeypatch.setattr(_common, "INTERPRETED", False)
    with triton_bn(), pytest.raises(dispatch.ImplementationUnavailable,
                                    match="'bn_gate_act' on cpu tensors.*TRITON_INTERPRET=1"):
        net(X, path="soft")


def test_requests_by_op(monkeypatch):
    monkeypatch.setenv("S2HK_IMPL", "cpp, bn_gate_act=triton")
    assert dispatch.requested_impl() == "cpp"
    assert dispatch.requested_impl("gates") == "cpp"
    assert dispatch.requested_impl(OP) == "triton"
    with dispatch.use_impl("reference"):  # a request for every op overrides the environment's
        assert dispatch.requested_impl(OP) == "reference"
        with dispatch.use_impl("triton", ops=(OP, "dual_conv")):
            assert dispatch.requested_impl(OP) == dispatch.requested_impl("dual_conv") == "triton"
            assert dispatch.requested_impl("gates") == dispatch.requested_impl() == "reference"
            with dispatch.use_impl("auto", ops=OP):
                assert dispatch.requested_impl(OP) == "auto"
                assert dispatch.requested_impl("dual_conv") == "triton"
        assert dispatch.requested_impl(OP) == "reference"
    monkeypatch.setenv("S2HK_IMPL", "bn_gate_act=fast")
    with pytest.raises(ValueError, match="got 'fast'"):
        dispatch.requested_impl(OP)
    with pytest.raises(ValueError, match="got 'fast'"):
        with dispatch.use_impl("fast", ops=(OP,)):
            pass


def test_auto_considers_the_kernel_for_channels_last_activations_only(monkeypatch):
    """The measured wins are for channels_last: NCHW activations stay on the composition under auto."""
    monkeypatch.setattr(dispatch, "choose", lambda op, device, kinds: "triton")  # as if measured faster here
    nchw = torch.randn(2, 4, 3, 3, device=DEVICE)
    assert layers._bn_impl(nchw) == "reference"
    assert layers._bn_impl(nchw.contiguous(memory_format=torch.channels_last)) == "triton"
    assert layers._bn_impl(torch.randn(5, 4, device=DEVICE)) == "triton"  # BatchNorm1d: channels innermost
    with triton_bn():  # an explicit request takes any layout
        assert layers._bn_impl(nchw) == "triton"
