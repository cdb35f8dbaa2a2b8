"""Vision Transformers (Dosovitskiy et al., 2021) for 32x32 inputs: ViT-Tiny and ViT-Small with 4x4 patches.

Written with standard layers only (``nn.Conv2d`` patch embedding, ``nn.Linear``, ``nn.LayerNorm``,
``nn.GELU``, ``nn.Dropout``) and plain attention (one fused ``qkv`` linear, ``matmul`` + ``softmax``), in the
common timm form, so that ``torch.fx.symbolic_trace`` records every projection, head split and product as
its own node. Nothing is modified in place; residual sums are ``x = x + f(x)``; the only branches test Python
attributes fixed at construction. Batch size and embedding width are read from the input's shape at run time
(never written into the graph as constants); the token count is fixed by ``image_size`` and ``patch_size``.

Tokens keep the embedding (channel) dimension LAST: ``(B, N, D)`` everywhere after the patch embedding; the
only reshapes of that dimension are attention's head split ``(B, N, 3 * D) -> (3, B, heads, N, D / heads)``
and merge ``(B, heads, N, D / heads) -> (B, N, D)``.

FLOPs below are ``2 x MACs`` of the patch-embedding convolution, every linear layer and the two attention
matrix products (``q @ k^T`` and ``attn @ v``) for one ``3x32x32`` image with ``num_classes=10`` and default
arguments (what ``torch.utils.flop_counter.FlopCounterMode`` reports; norms, softmax, GELU, bias and
position-embedding adds are not counted).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "init_transformer_weights",
    "PatchEmbed",
    "Mlp",
    "Attention",
    "Block",
    "VisionTransformer",
    "vit_tiny_cifar",
    "vit_small_cifar",
]


def init_transformer_weights(model: nn.Module) -> None:
    """Initialise ``model`` in place as timm does for ViT and Swin.

    Linear: truncated normal (std 0.02, absolute cut-offs +-2 as timm), zero bias; LayerNorm: weight 1, bias 0.
    Convolutions (the patch embedding) keep PyTorch's default initialisation. Class tokens, position
    embeddings and relative position bias tables are initialised by their owners (truncated normal, std 0.02).
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_divisible(value: int, divisor: int, message: str) -> None:
    if divisor <= 0 or value % divisor != 0:
        raise ValueError(message)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a ``patch_size`` x ``patch_size`` convolution with stride
    ``patch_size``, then flatten the grid, channels last; optionally a LayerNorm over the embedding.

    Shapes: (B, in_chans, H, W) -> (B, (H / patch_size) * (W / patch_size), embed_dim).
    """

    def __init__(
        self, image_size: int = 32, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 192, norm: bool = False
    ) -> None:
        super().__init__()
        _check_divisible(
            image_size, patch_size, f"image_size ({image_size}) must be divisible by patch_size ({patch_size})"
        )
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size * self.grid_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x


class Mlp(nn.Module):
    """The transformer feed-forward: ``fc1 -> GELU -> dropout -> fc2 -> dropout``.

    Shapes: (..., in_features) -> (..., in_features) through (..., hidden_features).
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (with bias) and an output projection.

    Shapes: (B, N, C) -> (B, N, C); internally q, k, v are (B, num_heads, N, C / num_heads) and the attention
    weights (B, num_heads, N, N).
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        _check_divisible(dim, num_heads, f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj_drop(self.proj(x))
        return x


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Shapes: (B, N, dim) -> (B, N, dim).
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nn.Module):
    """ViT with a class token and learned absolute position embeddings; classifies from the class token.

    Patch embedding (conv, stride ``patch_size``) -> prepend the class token -> add ``pos_embed`` -> dropout ->
    ``depth`` pre-norm :class:`Block` s -> LayerNorm -> token 0 -> linear head.

    Shapes: (B, 3, image_size, image_size) -> (B, num_classes); tokens are (B, 1 + num_patches, embed_dim)
    with ``num_patches = (image_size / patch_size) ** 2``.

    Raises:
        ValueError: ``image_size`` is not divisible by ``patch_size``, or ``embed_dim`` by ``num_heads``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        _check_divisible(embed_dim, num_heads, f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, embed_dim)
        self.num_tokens = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio, drop=drop_rate, attn_drop=attn_drop_rate) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        init_transformer_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> normalised tokens (B, 1 + num_patches, embed_dim)."""
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = x[:, 0]
        return self.head(self.head_drop(x))


def vit_tiny_cifar(
    num_classes: int = 10,
    image_size: int = 32,
    patch_size: int = 4,
    embed_dim: int = 192,
    depth: int = 12,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
) -> VisionTransformer:
    """ViT-Tiny (DeiT-Ti widths: 192-d, 12 blocks, 3 heads) on 4x4 patches: 64 patch tokens + 1 class token
    for a 32x32 image (5.36 M parameters with 10 classes).

    Dense cost at 1x3x32x32, 10 classes: 730,215,168 FLOPs (730.2 MFLOPs, 365.1 M MACs).

    Shapes: (N, 3, image_size, image_size) -> (N, num_classes).
    """
    return VisionTransformer(
        num_classes=num_classes,
        image_size=image_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        drop_rate=drop_rate,
        attn_drop_rate=attn_drop_rate,
    )


def vit_small_cifar(
    num_classes: int = 10,
    image_size: int = 32,
    patch_size: int = 4,
    embed_dim: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_ratio: float = 4.0,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
) -> VisionTransformer:
    """ViT-Small (DeiT-S widths: 384-d, 12 blocks, 6 heads) on 4x4 patches: 64 patch tokens + 1 class token
    for a 32x32 image (21.34 M parameters with 10 classes).

    Dense cost at 1x3x32x32, 10 classes: 2,840,618,496 FLOPs (2.841 GFLOPs, 1.420 G MACs).

    Shapes: (N, 3, image_size, image_size) -> (N, num_classes).
    """
    return VisionTransformer(
        num_classes=num_classes,
        image_size=image_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        drop_rate=drop_rate,
        attn_drop_rate=attn_drop_rate,
    )
