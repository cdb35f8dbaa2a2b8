"""User-written attention variants on the engine (graph analysis, path ops, export), checked three ways -- export == hard path, count_flops(export) == net.flops("hard"), and (for heads / MLP pruning) the hard
path == the dense model with the removed channels' producer rows zeroed (removing a head is the same as zeroing
its q, k, v rows; removing an MLP channel the same as zeroing its fc1 row, GELU(0) = 0)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk import TwoPathNetwork, count_flops
from s2hk.graph import UnsupportedModelError, analyze
from helpers import randomise_norms


# --- helpers -----------------------------------------------------------------------------------------------


def zeroed_dense(model: nn.Module, net: TwoPathNetwork, channels: dict, x: torch.Tensor) -> torch.Tensor:
    """The dense model with the producer rows (weight and bias) of every removed channel set to zero."""
    m = copy.deepcopy(model).eval()
    modules = dict(m.named_modules())
    for name, kept in channels.items():
        group = net.group(name)
        keep = set(kept)
        for spec in net.analysis.layers.values():
            if spec.kind == "norm" or spec.depthwise:
                continue
            offset = 0
            for seg in spec.out_layout:
                if seg.group == group.index:
                    for c in range(seg.size):
                        if c not in keep:
                            rows = slice(offset + c * seg.repeat, offset + (c + 1) * seg.repeat)
                            with torch.no_grad():
                                modules[spec.target].weight[rows] = 0
                                if modules[spec.target].bias is not None:
                                    modules[spec.target].bias[rows] = 0
                offset += seg.size * seg.repeat
    with torch.no_grad():
        return m(x)


def check(model: nn.Module, x: torch.Tensor, channels: dict, prune_embedding: bool = False,
          oracle: bool = True) -> TwoPathNetwork:
    net = TwoPathNetwork(model, x[:1], prune_embedding=prune_embedding)
    net.set_hard_widths(channels)
    net.eval()
    exported = net.export()
    with torch.no_grad():
        hard, out = net(x, path="hard"), exported(x)
    assert out.shape == hard.shape
    assert (out - hard).abs().max().item() <= 1e-5
    assert count_flops(exported, net.example_inputs) == net.flops("hard")
    if oracle:
        assert (zeroed_dense(model, net, channels, x) - hard).abs().max().item() <= 1e-9
    return net


def soft_at_binary_gates_minus_hard(net: TwoPathNetwork, channels: dict, x: torch.Tensor) -> float:
    """max |soft - hard| when every keep-probability is exactly 1 (kept channel) or 0 (removed channel)."""
    net.set_hard_widths(channels)
    net.eval()
    keep, _ = net.gates()
    keep = torch.zeros_like(keep)
    offsets = net.gate_layout.channel_offsets
    for slot, g in enumerate(net.prunable):
        for c in channels.get(g.name, range(g.channels)):
            keep[offsets[slot] + c] = 1
    with torch.no_grad():
        net.prepare_soft(keep.to(x.dtype))
        soft = net.run("soft", x)
        net.prepare_hard()
        hard = net.run("hard", x)
    return (soft - hard).abs().max().item()


# --- a configurable user-written ViT -------------------------------------------------------------------------


class Attention(nn.Module):
    """Fused qkv; ``style`` picks how q / k / v and the attention are written."""

    def __init__(self, dim: int, heads: int, style: str, tokens: int) -> None:
        super().__init__()
        self.h, self.style, self.scale = heads, style, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if style == "relbias":
            self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))
        if style == "sdpa_mask":
            self.mask = nn.Parameter(torch.randn(1, heads, tokens, tokens))

    def forward(self, x):
        B, N, C = x.shape
        if self.style == "chunk":                     # chunk(3, dim=-1), then a per-part view with -1
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            q, k, v = (t.view(B, N, self.h, -1).transpose(1, 2) for t in (q, k, v))
        elif self.style == "neox":                    # heads-major fused layout: (h, 3 * hd), chunk the last dim
            q, k, v = self.qkv(x).view(B, N, self.h, -1).transpose(1, 2).chunk(3, dim=-1)
        else:                                         # qkv[0] / qkv[1] / qkv[2] instead of unbind
            qkv = self.qkv(x).reshape(B, N, 3, self.h, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        if self.style == "causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.style == "sdpa_mask":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        else:
            a = q @ k.transpose(-2, -1) * self.scale
            if self.style == "relbias":
                a = a + self.bias.unsqueeze(0)
            a = a.softmax(-1)                         # positional dim
            o = a @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, style: str, tokens: int, post: bool, layer_scale: bool) -> None:
        super().__init__()
        self.post, self.layer_scale = post, layer_scale
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, style, tokens)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        if layer_scale:
            self.gamma1 = nn.Parameter(torch.rand(dim) + 0.5)
            self.gamma2 = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        if self.post:
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        a = self.attn(self.norm1(x))
        x = x + (a * self.gamma1 if self.layer_scale else a)
        m = self.mlp(self.norm2(x))
        return x + (self.gamma2 * m if self.layer_scale else m)


class ViT(nn.Module):
    """(B, 3, 8, 8) -> (B, 3); 4x4 patches: 4 tokens (+ a class token with pool="cls")."""

    def __init__(self, dim: int = 24, heads: int = 4, style: str = "index", post: bool = False,
                 layer_scale: bool = False, pool: str = "mean") -> None:
        super().__init__()
        self.pool = pool
        tokens = 5 if pool == "cls" else 4
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 4, dim) * 0.5)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.blocks = nn.Sequential(*[Block(dim, heads, style, tokens, post, layer_scale) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        if self.pool == "cls":
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1) if self.pool == "mean" else x[:, 0])


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).double()


def vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomise_norms(ViT(**kwargs)).double().eval()


def channel_lists(net: TwoPathNetwork, heads: list[int]) -> dict:
    out = {}
    for g in net.prunable:
        if g.name.endswith("qkv"):
            out[g.name] = heads
        elif g.name == "patch":
            out[g.name] = [0, 3, 5, 9, 10, 17, 23]
        else:
            out[g.name] = [1, 4, 30, 33]
    return out


VARIANTS = {
    "qkv_indexing": {"style": "index"},
    "chunk_then_view": {"style": "chunk"},
    "neox_fused": {"style": "neox"},
    "sdpa_causal": {"style": "causal"},
    "relative_bias": {"style": "relbias"},
    "post_norm": {"post": True},
    "layer_scale": {"layer_scale": True},
    "class_token": {"pool": "cls", "style": "chunk"},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("heads", [[1, 3], [2], [0, 1]])
def test_variants_heads_and_mlp(variant, heads):
    model = vit(**VARIANTS[variant])
    net = TwoPathNetwork(model, X[:1])
    assert sorted(g.channels for g in net.prunable) == [4, 4, 48, 48]
    check(model, X, channel_lists(net, heads))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_with_embedding_pruned(variant):
    model = vit(**VARIANTS[variant])
    net = TwoPathNetwork(model, X[:1], prune_embedding=True)
    assert any(g.name == "patch" for g in net.prunable)
    for heads in ([1, 3], [2]):
        check(model, X, channel_lists(net, heads), prune_embedding=True, oracle=False)


def test_torch_split_is_rejected_naming_the_layer():
    class SplitAttention(Attention):
        def forward(self, x):
            B, N, C = x.shape
            q, k, v = torch.split(self.qkv(x), C, dim=-1)
            q, k, v = (t.view(B, N, self.h, -1).transpose(1, 2) for t in (q, k, v))
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1))

    model = vit()
    for block in model.blocks:
        block.attn.__class__ = SplitAttention
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0\.attn.*split"):
        analyze(model, X[:1])


def test_a_single_head_is_frozen_and_the_mlp_still_pruned():
    model = vit(heads=1)
    net = TwoPathNetwork(model, X[:1])
    assert sorted(g.channels for g in net.prunable) == [48, 48]
    check(model, X, channel_lists(net, [0]))


def test_head_dim_one_with_chunked_qkv():
    model = vit(heads=24, style="chunk")
    net = TwoPathNetwork(model, X[:1])
    assert sorted(g.channels for g in net.prunable) == [24, 24, 48, 48]
    check(model, X, channel_lists(net, [1, 3, 20]))


def test_cnn_with_per_channel_parameters_and_flatten():
    """Parameters meeting channels in a CNN (now sliced, formerly frozen), SE with view/unsqueeze, flatten."""

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(c, c // 2), nn.Linear(c // 2, c)

        def forward(self, x):
            b, c, _, _ = x.size()
            y = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
            return x * y.view(b, c, 1).unsqueeze(-1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1)
            self.scale = nn.Parameter(torch.rand(1, 12, 1, 1) + 0.5)
            self.se, self.c3 = SE(12), nn.Conv2d(12, 6, 1)
            self.temp = nn.Parameter(torch.rand(6) + 0.5)
            self.fc = nn.Linear(6 * 16, 4)

        def forward(self, x):
            x = self.se(F.relu(self.c2(F.relu(self.c1(x))) * self.scale))
            x = F.relu(self.c3(x)) * self.temp.view(1, -1, 1, 1)
            return self.fc(x.view(x.size(0), -1))

    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(2, 3, 4, 4).double()
    check(model, x, {"c1": [1, 5, 6], "c2": [0, 3, 4, 9, 11], "c3": [1, 2, 5]}, oracle=False)


# --- bugs ----------------------------------------------------------------------------------------------------


class BertSelfAttention(nn.Module):
    """HuggingFace BERT's transpose_for_scores: the view's shape is computed at run time from ``x.size()``."""

    def __init__(self, dim: int = 24, heads: int = 4, head_size_explicit: bool = True) -> None:
        super().__init__()
        self.h, self.hd, self.explicit = heads, dim // heads, head_size_explicit
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.output = nn.Linear(dim, dim)

    def split(self, t):
        shape = t.size()[:-1] + ((self.h, self.hd) if self.explicit else (self.h, -1))
        return t.view(shape).permute(0, 2, 1, 3)

    def forward(self, x):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        a = (q @ k.transpose(-1, -2) / self.hd ** 0.5).softmax(-1)
        c = (a @ v).permute(0, 2, 1, 3).contiguous()
        if self.explicit:
            return self.output(c.view(c.size()[:-2] + (self.h * self.hd,)))
        return self.output(c.reshape(c.shape[0], c.shape[1], -1))


class TokenModel(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.embed = nn.Conv1d(5, 24, 1)            # (B, 5, N) -> (B, 24, N) -> tokens (B, N, 24)
        self.attn = BertSelfAttention(**kwargs)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        x = self.embed(x).transpose(1, 2)
        x = x + self.attn(x)
        return self.head(x.mean(1))


def test_view_with_a_shape_computed_at_run_time_explicit_head_size():
    """`t.view(t.size()[:-1] + (heads, head_size))` (one size sequence computed at run time): the hard path and the
    export rebuild it with the kept head count."""
    torch.manual_seed(0)
    model = TokenModel(head_size_explicit=True).double().eval()
    check(model, torch.randn(2, 5, 7).double(), {"attn.query": [0, 2]})


def test_view_with_a_shape_computed_at_run_time_inferred_head_size():
    """Same with -1 for the head size: the kept heads keep their size (checked against the dense model with the
    removed heads zeroed, not only against the export)."""
    torch.manual_seed(0)
    model = TokenModel(head_size_explicit=False).double().eval()
    check(model, torch.randn(2, 5, 7).double(), {"attn.query": [0, 2]})


def test_sdpa_with_a_per_head_constant_mask_is_cut_to_the_kept_heads():
    """A per-head attn_mask parameter (1, heads, N, N) is cut to the kept heads, as a bias added to the scores is."""
    model = vit(style="sdpa_mask")
    try:
        net = TwoPathNetwork(model, X[:1])
    except UnsupportedModelError:
        return
    check(model, X, channel_lists(net, [1, 3]))


def test_ignoring_the_attention_modules_of_a_vit():
    """`ignore=[...]` inside a transformer: the ignored nodes keep their input's channel dimension (tokens: last),
    so the residual adds still line up; the MLPs stay prunable."""
    model = vit(style="sdpa_mask")
    net = TwoPathNetwork(model, X[:1], ignore=["blocks.0.attn", "blocks.1.attn"])
    assert sorted(g.channels for g in net.prunable) == [48, 48]
    net.set_hard_widths({g.name: [1, 4, 30, 33] for g in net.prunable})
    net.eval()
    exported = net.export()
    with torch.no_grad():
        assert (exported(X) - net(X, path="hard")).abs().max().item() <= 1e-9


def test_additive_channel_parameter_soft_path_at_binary_gates_equals_hard():
    """`conv(x) + self.shift` (a per-channel parameter): cut to the kept channels on the hard path and scaled by
    the keep-probabilities on the soft path, so at 0/1 gates the soft path is the hard one."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
            self.shift = nn.Parameter(torch.randn(1, 8, 1, 1))

        def forward(self, x):
            return self.c2(F.relu(self.c1(x) + self.shift)).mean((2, 3))

    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(2, 3, 5, 5).double()
    net = TwoPathNetwork(model, x[:1])
    if not net.group("c1").prunable:
        return
    assert soft_at_binary_gates_minus_hard(net, {"c1": [0, 2, 5]}, x) <= 1e-9


def test_squeeze_excite_with_expand_as():
    """The squeeze-excite idiom `x * y.expand_as(x)`: y is the attention branch (its producer is not gated)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.fc, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = F.relu(self.c1(x))
            b, c, _, _ = x.size()
            y = torch.sigmoid(self.fc(x.mean((2, 3)))).view(b, c, 1, 1)
            return self.c2(x * y.expand_as(x)).mean((2, 3))

    torch.manual_seed(0)
    model = Net().double().eval()
    check(model, torch.randn(2, 3, 5, 5).double(), {"c1": [0, 2, 5]}, oracle=False)


@pytest.mark.parametrize("name", ["vit_tiny_cifar", "swin_tiny_cifar"])
def test_soft_path_at_binary_gates_is_the_hard_path_on_shipped_transformers(name):
    """Keep-probabilities of exactly 0 and 1 make the soft path compute the hard network (embedding kept)."""
    from s2hk import models

    torch.manual_seed(0)
    small = {"vit_tiny_cifar": {"depth": 2},
             "swin_tiny_cifar": {"depths": (2, 2), "num_heads": (3, 6), "embed_dim": 24}}[name]
    model = randomise_norms(models.get_model(name, image_size=16, **small)).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    net = TwoPathNetwork(model, x[:1])
    g = torch.Generator().manual_seed(1)
    channels = {grp.name: sorted(torch.randperm(grp.channels, generator=g)[:max(1, grp.channels // 2)].tolist())
                for grp in net.prunable}
    assert soft_at_binary_gates_minus_hard(net, channels, x) <= 1e-9


def test_token_inputs_embedded_by_a_linear_layer():
    """A (B, N, D_in) token input read by nn.Linear has its channels last; heads and MLP are pruned as usual."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(5, 24)
            self.block = Block(24, 4, "index", 7, post=False, layer_scale=False)
            self.head = nn.Linear(24, 3)

        def forward(self, x):  # (B, 7 tokens, 5 features)
            return self.head(self.block(self.embed(x)).mean(1))

    torch.manual_seed(0)
    model = randomise_norms(Tokens()).double().eval()
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    check(model, x, {"block.attn.qkv": [1, 3], "block.mlp.0": list(range(0, 48, 3))})


def test_a_table_made_from_a_traced_size_freezes_the_channels_it_meets():
    """A sin-cos table built from ``x.shape[-1]`` already has the hard path's width there: the channels it is
    added to are kept whole (with the reason) rather than cut twice."""

    class SinCos(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(5, 24)
            self.fc1, self.fc2 = nn.Linear(24, 48), nn.Linear(48, 24)
            self.head = nn.Linear(24, 3)

        def forward(self, x):  # (B, N, 5)
            h = self.embed(x)
            n, d = h.shape[1], h.shape[-1]
            table = torch.sin(torch.arange(n, dtype=h.dtype)[:, None] * torch.arange(d, dtype=h.dtype)[None, :])
            h = h + table
            return self.head((h + self.fc2(F.relu(self.fc1(h)))).mean(1))

    a = analyze(SinCos(), torch.randn(2, 7, 5))
    embedding = next(g for g in a.groups if g.name == "embed")
    assert not embedding.prunable and any("size" in r for r in embedding.frozen_reasons)
    assert next(g for g in a.groups if g.name == "fc1").prunable


def test_swiglu_mlp():
    """``a, b = fc1(x).chunk(2, -1); fc2(a * silu(b))``: both halves keep the same hidden channels."""

    class SwiGLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(5, 24)
            self.fc1, self.fc2 = nn.Linear(24, 96), nn.Linear(48, 24)
            self.head = nn.Linear(24, 3)

        def forward(self, x):
            h = self.embed(x)
            a, b = self.fc1(h).chunk(2, dim=-1)
            return self.head((h + self.fc2(a * F.silu(b))).mean(1))

    torch.manual_seed(0)
    model = SwiGLU().double().eval()
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    net = check(model, x, {"fc1": [0, 5, 7, 30, 47]}, oracle=False)
    assert net.group("fc1").channels == 48
    assert soft_at_binary_gates_minus_hard(net, {"fc1": [0, 5, 7, 30, 47]}, x) <= 1e-9
