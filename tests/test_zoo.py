"""The zoo's patterns end to end (tests/zoo.py): each model, handed over in train mode with no ``ignore``,
prunes, trains a step, and exports a deterministic plain model equal to the hard path, with FLOPs equal to
torch's counter."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import s2hk
from helpers import randomise_norms
from zoo import ZOO

SIZE = 16


def torch_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def half_widths(net: s2hk.TwoPathNetwork, seed: int) -> dict[str, list[int]]:
    """A random half (at least one) of every prunable group's channels."""
    gen = torch.Generator().manual_seed(seed)
    return {g.name: sorted(torch.randperm(g.channels, generator=gen)[:max(1, g.channels // 2)].tolist())
            for g in net.prunable}


def check_export(pruner: s2hk.TwoPathNetwork, x: torch.Tensor) -> None:
    """The export (eval mode) is plain torch, deterministic, equal to the hard path, with the hard path's
    FLOPs by torch's counter."""
    pruner.eval()
    small = pruner.export().eval()
    with torch.no_grad():
        first, second, hard = small(x), small(x), pruner(x, path="hard")
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, hard, rtol=1e-4, atol=1e-5)
    assert pruner.flops("hard") == torch_flops(small, x[:1])
    assert all(type(m).__module__.startswith("torch") for m in small.modules())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_s2hpruner_prunes_trains_and_exports(name):
    torch.manual_seed(0)
    model = randomise_norms(ZOO[name]()).train()
    x = torch.randn(4, 3, SIZE, SIZE)
    y = torch.randint(0, 10, (4,))
    pruner = s2hk.S2HPruner(model, x[:1], target_flops=0.5)
    assert pruner.prunable, pruner.analysis.report()
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.01)
    metrics = pruner.train_step(x, y, opt)
    assert all(v == v for v in metrics.values()), metrics  # no NaN
    pruner.set_hard_widths(half_widths(pruner, seed=1))
    check_export(pruner, x)
    assert pruner.flops("full") == torch_flops(model, x[:1])


@pytest.mark.parametrize("name", sorted(ZOO))
def test_stp_prunes_searches_and_exports(name):
    """STP on the same models: a joint step (full network and subnets), a search at the budget (widths and,
    where the graph has skippable residual blocks, depth), and the best subnet's export."""
    torch.manual_seed(0)
    model = randomise_norms(ZOO[name]()).train()
    x = torch.randn(4, 3, SIZE, SIZE)
    y = torch.randint(0, 10, (4,))
    pruner = s2hk.STPruner(model, x[:1], target_flops=0.6, tolerance=0.1, total_epochs=1, population=3,
                           generations=1, held_out_batches=1, calibration_batches=1)
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.01)
    for _ in range(2):
        pruner.train_step(x, y, opt)
    result = pruner.search()
    assert result is not None and result["flops_ratio"] <= 0.7, result
    check_export(pruner, x)


@pytest.mark.parametrize("structure", ["layers", "groups"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_crsfp_prunes_trains_and_exports(name, structure):
    """CR-SFP on the same models, masking every block conv on its own (the authors' way) or whole channel
    groups: a step on two views, then the P-NN's export equals the hard path, with torch's FLOPs count."""
    torch.manual_seed(0)
    model = randomise_norms(ZOO[name]()).train()
    x = torch.randn(4, 3, SIZE, SIZE)
    y = torch.randint(0, 10, (4,))
    pruner = s2hk.CRSFPruner(model, x[:1], prune_rate=0.3, structure=structure)
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.01)
    pruner.train_step((x, x.flip(3)), y, opt)
    pruner.on_epoch_end()
    check_export(pruner, x)
    assert pruner.flops("hard") <= torch_flops(model, x[:1])
