"""Swin Transformer (Liu et al., 2021), Swin-T widths, adapted to 32x32 inputs.

A 2x2 patch embedding (stride-2 convolution + LayerNorm) turns a 32x32 image into 16x16 tokens of 96
channels; four stages of (2, 2, 6, 2) blocks run at 16x16, 8x8, 4x4 and 2x2 tokens with 96, 192, 384 and 768
channels, a patch merging (2x2 neighbourhood concat -> LayerNorm -> bias-free linear 4C -> 2C) between
stages. Blocks alternate window attention (W-MSA) and shifted-window attention (SW-MSA, cyclic shift by
``window_size // 2``); where a stage's resolution is not larger than ``window_size`` the window is the whole
resolution and no block shifts (stages 3 and 4 at the defaults: one 4x4 and one 2x2 window).

Built from standard layers (``nn.Conv2d``, ``nn.Linear``, ``nn.LayerNorm``, ``nn.GELU``, ``nn.Dropout``)
with plain attention written as in :mod:`s2hk.models.vit`, plus a relative position bias (a parameter table
indexed by the ``relative_position_index`` buffer) and, per block, an additive ``attn_mask`` buffer computed at
construction: all zeros for non-shifted blocks, ``-100`` between tokens that the cyclic shift brought into
one window from different image regions. Every block adds its mask (adding zeros keeps one code path and
costs no counted FLOPs). Stochastic depth is not implemented (it is not a standard layer).

Spatial sizes are Python ints fixed at construction (no padding: sizes must divide, else ``ValueError``);
batch size and channel counts are read from the input's shape at run time. Tokens keep channels on the LAST
dimension everywhere after the patch embedding: ``(B, L, C)`` between blocks, ``(B, H, W, C)`` for the shift
and window partition, ``(B * nW, window_size ** 2, C)`` inside attention. The channel dimension is reshaped
only by attention's head split/merge and by the patch-merging concat.

FLOPs below are ``2 x MACs`` of the patch-embedding convolution, every linear layer and attention's
``q @ k^T`` and ``attn @ v`` products for one ``3x32x32`` image with ``num_classes=10`` and default
arguments (what ``torch.utils.flop_counter.FlopCounterMode`` reports; norms, softmax, GELU, bias, mask and
position-bias adds are not counted).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .vit import Mlp, PatchEmbed, _check_divisible, init_transformer_weights

__all__ = [
    "window_partition",
    "window_reverse",
    "relative_position_index",
    "shifted_window_mask",
    "WindowAttention",
    "SwinTransformerBlock",
    "PatchMerging",
    "SwinStage",
    "SwinTransformer",
    "swin_tiny_cifar",
]

# The additive mask value between tokens that must not attend to each other (the paper's code uses -100:
# exp(-100) underflows against any logit of a normal scale, and it stays finite in float16).
MASK_VALUE = -100.0


def window_partition(x: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Split a (B, height, width, C) map into non-overlapping windows: (B * nW, window_size ** 2, C), windows
    in row-major order of the window grid, tokens row-major within a window (``nW = height * width /
    window_size ** 2``)."""
    B = x.shape[0]
    C = x.shape[-1]
    x = x.view(B, height // window_size, window_size, width // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size * window_size, C)


def window_reverse(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window_size ** 2, C) -> (B, height, width, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, height, width, C)


def relative_position_index(window_size: int) -> Tensor:
    """(N, N) int64 index, ``N = window_size ** 2``, of the relative offset of token j from token i inside a
    window into a ((2 * window_size - 1) ** 2)-row bias table: ``(dy + w - 1) * (2w - 1) + (dx + w - 1)``."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ).flatten(1)  # (2, N)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)  # (N, N, 2)
    return relative[:, :, 0] * (2 * window_size - 1) + relative[:, :, 1]


def shifted_window_mask(resolution: int, window_size: int, shift_size: int) -> Tensor:
    """(nW, N, N) additive attention mask for windows of a (resolution x resolution) map cyclically shifted by
    ``-shift_size``: 0 where two tokens of a window came from the same region of the unshifted map,
    :data:`MASK_VALUE` where the roll wrapped one of them around. All zeros when ``shift_size == 0``."""
    n_windows = (resolution // window_size) ** 2
    n = window_size * window_size
    if shift_size == 0:
        return torch.zeros(n_windows, n, n)
    regions = torch.zeros(1, resolution, resolution, 1)
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for h in slices:
        for w in slices:
            regions[:, h, w, :] = label
            label += 1
    region_windows = window_partition(regions, window_size, resolution, resolution).squeeze(-1)  # (nW, N)
    different = region_windows.unsqueeze(1) != region_windows.unsqueeze(2)
    return torch.zeros(n_windows, n, n).masked_fill(different, MASK_VALUE)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias and an additive mask.

    Shapes: x (B * nW, N, C) with ``N = window_size ** 2``, mask (nW, N, N) -> (B * nW, N, C); attention
    weights are (B * nW, num_heads, N, N).
    """

    def __init__(
        self, dim: int, window_size: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        _check_divisible(dim, num_heads, f"stage width ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, -1).permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        nW = mask.shape[0]
        attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, N, N)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        x = self.proj_drop(self.proj(x))
        return x


class SwinTransformerBlock(nn.Module):
    """Pre-norm Swin block on a fixed ``resolution x resolution`` token map:
    ``x + reverse(attn(partition(roll(norm1(x)))))`` then ``x + mlp(norm2(x))``.

    ``shift_size`` is 0 (W-MSA) or the cyclic shift of SW-MSA; if ``resolution <= window_size`` the window
    becomes the whole map and the shift 0. ``attn_mask`` (buffer, (nW, N, N)) is computed here.

    Shapes: (B, resolution ** 2, dim) -> (B, resolution ** 2, dim).
    """

    def __init__(
        self,
        dim: int,
        resolution: int,
        num_heads: int,
        window_size: int = 4,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if resolution <= window_size:
            window_size, shift_size = resolution, 0
        _check_divisible(
            resolution, window_size, f"window_size ({window_size}) must divide the stage resolution ({resolution})"
        )
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size ({shift_size}) must be in [0, window_size={window_size})")
        self.dim = dim
        self.resolution = resolution
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.num_windows = (resolution // window_size) ** 2
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.register_buffer("attn_mask", shifted_window_mask(resolution, window_size, shift_size))

    def forward(self, x: Tensor) -> Tensor:
        H = W = self.resolution
        B, L, C = x.shape
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(x, self.window_size, H, W)  # (B * nW, ws * ws, C)
        windows = self.attn(windows, self.attn_mask)
        x = window_reverse(windows, self.window_size, H, W)  # (B, H, W, C)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + x.view(B, L, C)
        x = x + self.mlp(self.norm2(x))
        return x


class PatchMerging(nn.Module):
    """Downsample a ``resolution x resolution`` token map by 2: concatenate each 2x2 neighbourhood's channels
    (order x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]), LayerNorm(4C), linear 4C -> 2C without
    bias.

    Shapes: (B, resolution ** 2, C) -> (B, (resolution / 2) ** 2, 2C).
    """

    def __init__(self, dim: int, resolution: int) -> None:
        super().__init__()
        _check_divisible(resolution, 2, f"patch merging needs an even resolution, got {resolution}")
        self.dim = dim
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        H = W = self.resolution
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1)
        x = x.view(B, -1, 4 * C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``depth`` Swin blocks at one resolution, W-MSA and SW-MSA alternating (even blocks unshifted), then an
    optional :class:`PatchMerging`.

    Shapes: (B, resolution ** 2, dim) -> (B, resolution ** 2, dim), or (B, (resolution / 2) ** 2, 2 dim) with
    ``downsample``.
    """

    def __init__(
        self,
        dim: int,
        resolution: int,
        depth: int,
        num_heads: int,
        window_size: int = 4,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        downsample: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.resolution = resolution
        self.blocks = nn.Sequential(
            *[
                SwinTransformerBlock(
                    dim,
                    resolution,
                    num_heads,
                    window_size=window_size,
                    shift_size=0 if i % 2 == 0 else window_size // 2,
                    mlp_ratio=mlp_ratio,
                    drop=drop,
                    attn_drop=attn_drop,
                )
                for i in range(depth)
            ]
        )
        self.downsample = PatchMerging(dim, resolution) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class SwinTransformer(nn.Module):
    """Swin Transformer: patch embedding (+ LayerNorm) -> dropout -> stages (patch merging between them) ->
    LayerNorm -> mean over tokens -> linear head. Stage ``i`` has ``embed_dim * 2 ** i`` channels on a
    ``(image_size / patch_size / 2 ** i)``-square token map.

    Shapes: (B, 3, image_size, image_size) -> (B, num_classes).

    Raises:
        ValueError: a size does not divide (the message names ``image_size``/``patch_size``, ``window_size``,
            ``num_heads`` or ``depths``), or ``depths`` and ``num_heads`` differ in length.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 2,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 4,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {depths} and num_heads {num_heads} must be non-empty and of equal length")
        if window_size < 1:
            raise ValueError(f"window_size must be positive, got {window_size}")
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, embed_dim, norm=True)
        resolution = self.patch_embed.grid_size
        if resolution % (2 ** (len(depths) - 1)) != 0:
            raise ValueError(
                f"the token map ({resolution}x{resolution} = image_size / patch_size) must halve "
                f"{len(depths) - 1} times for depths {depths}"
            )
        self.pos_drop = nn.Dropout(drop_rate)
        stages = []
        dim = embed_dim
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            last = i == len(depths) - 1
            stages.append(
                SwinStage(
                    dim,
                    resolution,
                    depth,
                    heads,
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    downsample=not last,
                )
            )
            if not last:
                dim, resolution = dim * 2, resolution // 2
        self.stages = nn.Sequential(*stages)
        self.num_features = dim
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        init_transformer_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> normalised last-stage tokens (B, L_last, num_features)."""
        x = self.pos_drop(self.patch_embed(x))
        x = self.stages(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = x.mean(dim=1)
        return self.head(x)


def swin_tiny_cifar(
    num_classes: int = 10,
    image_size: int = 32,
    patch_size: int = 2,
    embed_dim: int = 96,
    depths: Sequence[int] = (2, 2, 6, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    window_size: int = 4,
    mlp_ratio: float = 4.0,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
) -> SwinTransformer:
    """Swin-T widths and depths (96-d, (2, 2, 6, 2) blocks, (3, 6, 12, 24) heads) on 2x2 patches with 4x4
    windows: 16x16, 8x8, 4x4, 2x2 tokens for a 32x32 image (27.51 M parameters with 10 classes).

    Dense cost at 1x3x32x32, 10 classes: 715,570,176 FLOPs (715.6 MFLOPs, 357.8 M MACs).

    Shapes: (N, 3, image_size, image_size) -> (N, num_classes).
    """
    return SwinTransformer(
        num_classes=num_classes,
        image_size=image_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        window_size=window_size,
        mlp_ratio=mlp_ratio,
        drop_rate=drop_rate,
        attn_drop_rate=attn_drop_rate,
    )
