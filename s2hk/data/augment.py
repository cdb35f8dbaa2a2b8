"""Augmentation in plain torch, batched, with every random draw taken from an explicit generator.

Images are float tensors ``(B, C, H, W)`` with pixel values in ``[0, 1]`` (normalisation comes after
augmentation, so crop padding is black as in the usual PIL pipelines). Random parameters are drawn on the
CPU from the ``torch.Generator`` passed in and only then moved to the images' device, so a batch is
bit-identical whichever device applies it and the global RNG is never used.

Named augmentations (see :data:`AUGMENTATIONS`):

- ``"none"``: resize to ``size x size`` if needed (bilinear), nothing random;
- ``"crop_flip"``: random crop of a zero-padded image (pad ``size / 8``: 4 pixels at 32x32) + horizontal
  flip with probability 1/2 -- the CIFAR recipe;
- ``"translate"``: the same crop with pad ``size / 16`` (2 pixels at 32x32) and no flip -- for digits,
  which are not mirror-symmetric;
- ``"resized_crop_flip"``: random-resized-crop (area 8%..100%, aspect 3/4..4/3) + flip -- the ImageNet
  recipe;
- ``"resize_center_crop"``: resize the shorter side to ``size / 0.875`` then center-crop ``size`` -- the
  ImageNet evaluation transform.

Each augmentation works on a batch of equal-size images (``aug(x, size, gen)``) and on a list of
decoded images of any sizes (``aug.apply_images(images, size, gen)``), the latter for lazily decoded
folders where cropping must see the full-resolution image.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "to_float",
    "resize",
    "normalize",
    "sample_crop_offsets",
    "crop_padded",
    "random_crop",
    "sample_flips",
    "flip_where",
    "random_flip",
    "sample_resized_crop_boxes",
    "resized_crop",
    "resize_center_crop",
    "Augmentation",
    "NoAugment",
    "RandomCropFlip",
    "RandomResizedCropFlip",
    "ResizeCenterCrop",
    "AUGMENTATIONS",
    "get_augmentation",
    "augment_two_views",
]


# ---------------------------------------------------------------------------------------------------------
# Deterministic building blocks
# ---------------------------------------------------------------------------------------------------------

def to_float(images: Tensor) -> Tensor:
    """uint8 pixels 0..255 -> float32 0..1; float input is returned as float32 unchanged in value."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(B, C, H, W)`` to ``size`` (``int`` = square); antialiased when shrinking.

    Returns ``x`` itself when it already has the requested size.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x
    shrink = out_h < in_h or out_w < in_w
    return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=shrink)


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(x - mean) / std`` per channel; ``mean``/``std`` have shape ``(C,)``."""
    mean = mean.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = std.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def sample_crop_offsets(batch: int, pad: int, gen: torch.Generator) -> Tensor:
    """Window offsets ``(B, 2)`` int64 ``(top, left)``, uniform in ``0..2*pad`` (``pad`` = no shift)."""
    return torch.randint(0, 2 * pad + 1, (batch, 2), generator=gen)


def crop_padded(x: Tensor, offsets: Tensor, pad: int) -> Tensor:
    """Zero-pad ``x`` ``(B, C, H, W)`` by ``pad`` pixels on every side, then take the ``H x W`` window at
    ``offsets[b] = (top, left)`` of the padded image, for every ``b`` at once (one gather)."""
    b, c, h, w = x.shape
    if pad == 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad))
    wp = w + 2 * pad
    offsets = offsets.to(x.device)
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
    flat_index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat_index).reshape(b, c, h, w)


def random_crop(x: Tensor, pad: int, gen: torch.Generator) -> Tensor:
    """Random ``H x W`` crop of the zero-padded batch: a shift of up to ``pad`` pixels each way."""
    return crop_padded(x, sample_crop_offsets(x.shape[0], pad, gen), pad)


def sample_flips(batch: int, gen: torch.Generator, p: float = 0.5) -> Tensor:
    """Bool ``(B,)``: which images to mirror, each with probability ``p``."""
    return torch.rand(batch, generator=gen) < p


def flip_where(x: Tensor, flips: Tensor) -> Tensor:
    """Mirror (left-right) the images of ``x`` ``(B, C, H, W)`` where ``flips`` ``(B,)`` is true."""
    return torch.where(flips.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def random_flip(x: Tensor, gen: torch.Generator, p: float = 0.5) -> Tensor:
    """Horizontal flip of each image with probability ``p``."""
    return flip_where(x, sample_flips(x.shape[0], gen, p))


def sample_resized_crop_boxes(heights: Tensor, widths: Tensor, gen: torch.Generator,
                              scale: tuple[float, float] = (0.08, 1.0),
                              ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
                              attempts: int = 10) -> Tensor:
    """Random-resized-crop boxes, vectorised over the batch.

    For image ``b`` of ``heights[b] x widths[b]`` pixels: draw ``attempts`` (area fraction in ``scale``,
    log-uniform aspect ratio in ``ratio``) pairs, keep the first whose box fits, and place it uniformly;
    if none fits, take the largest centred box with aspect ratio clamped to ``ratio`` (torchvision's
    rule). The number of random draws is fixed, so the stream stays aligned whatever the outcome.

    Returns int64 ``(B, 4)``: ``(top, left, height, width)`` in pixels.
    """
    hs = heights.to(torch.float64).view(-1, 1)
    ws = widths.to(torch.float64).view(-1, 1)
    n = hs.shape[0]
    area = hs * ws
    u_scale = torch.rand(n, attempts, generator=gen, dtype=torch.float64)
    u_ratio = torch.rand(n, attempts, generator=gen, dtype=torch.float64)
    u_pos = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    fits = (cw > 0) & (ch > 0) & (cw <= ws) & (ch <= hs)
    found = fits.any(dim=1)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # index of the first fitting attempt
    cw = cw.gather(1, first).squeeze(1)
    ch = ch.gather(1, first).squeeze(1)
    hs, ws = hs.squeeze(1), ws.squeeze(1)
    # Fallback: centred box with the aspect ratio clamped into the allowed range.
    in_ratio = ws / hs
    fw = torch.where(in_ratio < ratio[0], ws, torch.where(in_ratio > ratio[1], torch.round(hs * ratio[1]), ws))
    fh = torch.where(in_ratio < ratio[0], torch.round(ws / ratio[0]),
                     torch.where(in_ratio > ratio[1], hs, hs))
    cw = torch.where(found, cw, fw)
    ch = torch.where(found, ch, fh)
    top = torch.where(found, torch.floor(u_pos[:, 0] * (hs - ch + 1)), torch.floor((hs - ch) / 2))
    left = torch.where(found, torch.floor(u_pos[:, 1] * (ws - cw + 1)), torch.floor((ws - cw) / 2))
    top = torch.minimum(top, hs - ch)  # u_pos < 1, but guard against rounding at the upper edge
    left = torch.minimum(left, ws - cw)
    return torch.stack([top, left, ch, cw], dim=1).to(torch.int64)


def resized_crop(x: Tensor, boxes: Tensor, size: int, flips: Tensor | None = None) -> Tensor:
    """Crop box ``boxes[b] = (top, left, h, w)`` of each image of ``x`` ``(B, C, H, W)`` and resize it to
    ``size x size`` (bilinear, border-clamped, like ``F.interpolate`` with ``align_corners=False``), all in
    one ``grid_sample``; ``flips`` (bool ``(B,)``) mirrors the result. No antialiasing: for in-memory
    datasets crops are at most the native size, so this is mostly upsampling."""
    b, c, h, w = x.shape
    boxes = boxes.to(device=x.device, dtype=x.dtype)
    top, left, bh, bw = boxes.unbind(1)
    sign = torch.ones(b, device=x.device, dtype=x.dtype)
    if flips is not None:
        sign = torch.where(flips.to(x.device), -sign, sign)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = sign * bw / w
    theta[:, 0, 2] = (2 * left + bw) / w - 1
    theta[:, 1, 1] = bh / h
    theta[:, 1, 2] = (2 * top + bh) / h - 1
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _resize_shorter(h: int, w: int, shorter: int) -> tuple[int, int]:
    # torchvision's Resize(int): the shorter side becomes `shorter`, the longer one is scaled and truncated.
    if h <= w:
        return shorter, int(shorter * w / h)
    return int(shorter * h / w), shorter


def resize_center_crop(x: Tensor, size: int, crop_fraction: float = 0.875) -> Tensor:
    """Resize the shorter side of ``x`` ``(B, C, H, W)`` to ``round(size / crop_fraction)`` and take the
    centred ``size x size`` crop (256 -> 224 at ``size=224``)."""
    h, w = x.shape[-2:]
    new_h, new_w = _resize_shorter(h, w, int(round(size / crop_fraction)))
    x = resize(x, (new_h, new_w))
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


# ---------------------------------------------------------------------------------------------------------
# Named augmentations
# ---------------------------------------------------------------------------------------------------------

def _require_generator(name: str, gen: torch.Generator | None) -> torch.Generator:
    if gen is None:
        raise ValueError(f"augmentation {name!r} is random and needs an explicit torch.Generator "
                         "(the global RNG is never used)")
    return gen


class Augmentation:
    """Base class: resize to ``size x size`` only (the ``"none"`` transform).

    ``aug(x, size, gen)`` maps a float batch ``(B, C, H, W)`` in ``[0, 1]`` to ``(B, C, size, size)``.
    ``aug.apply_images(images, size, gen)`` does the same for a list of decoded ``(C, h, w)`` images of
    possibly different sizes (uint8 or float) and returns the stacked float batch.
    """

    name = "none"
    random = False

    def __call__(self, x: Tensor, size: int, gen: torch.Generator | None = None) -> Tensor:
        return resize(x, size)

    def apply_images(self, images: Sequence[Tensor], size: int, gen: torch.Generator | None = None) -> Tensor:
        if all(img.shape == images[0].shape for img in images):
            batch = to_float(torch.stack(list(images)))
        else:
            batch = torch.cat([resize(to_float(img)[None], size) for img in images])
        return self(batch, size, gen)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoAugment(Augmentation):
    """``"none"``: resize only."""


class RandomCropFlip(Augmentation):
    """Random crop of the zero-padded image, optionally followed by a random horizontal flip.

    ``pad_fraction`` sets the padding relative to the output size: ``pad = max(1, round(size *
    pad_fraction))`` pixels, i.e. 4 at 32x32 for ``1/8``.
    """

    def __init__(self, pad_fraction: float = 1.0 / 8.0, flip: bool = True, name: str = "crop_flip") -> None:
        self.pad_fraction = pad_fraction
        self.flip = flip
        self.name = name
        self.random = True

    def pad_for(self, size: int) -> int:
        """Padding in pixels at output size ``size``."""
        return max(1, int(round(size * self.pad_fraction)))

    def __call__(self, x: Tensor, size: int, gen: torch.Generator | None = None) -> Tensor:
        gen = _require_generator(self.name, gen)
        x = random_crop(resize(x, size), self.pad_for(size), gen)
        return random_flip(x, gen) if self.flip else x

    def __repr__(self) -> str:
        return f"RandomCropFlip(pad_fraction={self.pad_fraction}, flip={self.flip})"


class RandomResizedCropFlip(Augmentation):
    """Random-resized-crop to ``size x size`` + horizontal flip (the ImageNet training transform)."""

    name = "resized_crop_flip"
    random = True

    def __init__(self, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)) -> None:
        self.scale = scale
        self.ratio = ratio

    def __call__(self, x: Tensor, size: int, gen: torch.Generator | None = None) -> Tensor:
        gen = _require_generator(self.name, gen)
        b, _, h, w = x.shape
        boxes = sample_resized_crop_boxes(torch.full((b,), h), torch.full((b,), w), gen, self.scale, self.ratio)
        return resized_crop(x, boxes, size, sample_flips(b, gen))

    def apply_images(self, images: Sequence[Tensor], size: int, gen: torch.Generator | None = None) -> Tensor:
        # Per image: the crop must see the full-resolution image, whose size varies.
        gen = _require_generator(self.name, gen)
        heights = torch.tensor([img.shape[-2] for img in images])
        widths = torch.tensor([img.shape[-1] for img in images])
        boxes = sample_resized_crop_boxes(heights, widths, gen, self.scale, self.ratio).tolist()
        flips = sample_flips(len(images), gen).tolist()
        out = []
        for img, (top, left, bh, bw), flip in zip(images, boxes, flips):
            crop = resize(to_float(img[:, top:top + bh, left:left + bw])[None], size)
            out.append(crop.flip(-1) if flip else crop)
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"RandomResizedCropFlip(scale={self.scale}, ratio={self.ratio})"


class ResizeCenterCrop(Augmentation):
    """Shorter side to ``size / crop_fraction``, then the centred ``size x size`` crop (ImageNet eval)."""

    name = "resize_center_crop"

    def __init__(self, crop_fraction: float = 0.875) -> None:
        self.crop_fraction = crop_fraction

    def __call__(self, x: Tensor, size: int, gen: torch.Generator | None = None) -> Tensor:
        return resize_center_crop(x, size, self.crop_fraction)

    def apply_images(self, images: Sequence[Tensor], size: int, gen: torch.Generator | None = None) -> Tensor:
        return torch.cat([resize_center_crop(to_float(img)[None], size, self.crop_fraction) for img in images])

    def __repr__(self) -> str:
        return f"ResizeCenterCrop(crop_fraction={self.crop_fraction})"


AUGMENTATIONS: dict[str, Callable[[], Augmentation]] = {
    "none": NoAugment,
    "crop_flip": lambda: RandomCropFlip(1.0 / 8.0, flip=True, name="crop_flip"),
    "translate": lambda: RandomCropFlip(1.0 / 16.0, flip=False, name="translate"),
    "resized_crop_flip": RandomResizedCropFlip,
    "resize_center_crop": ResizeCenterCrop,
}


def get_augmentation(name: str | Augmentation) -> Augmentation:
    """The augmentation called ``name`` (see :data:`AUGMENTATIONS`); an instance is returned as is."""
    if isinstance(name, Augmentation):
        return name
    try:
        return AUGMENTATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(sorted(AUGMENTATIONS))}") from None


def augment_two_views(x: Tensor, augment: Augmentation, size: int,
                      generators: tuple[torch.Generator, torch.Generator]) -> tuple[Tensor, Tensor]:
    """Two independently augmented views of the same batch ``x`` ``(B, C, H, W)``, one per generator.

    Both views keep the sample order of ``x``, so they share its labels.
    """
    gen1, gen2 = generators
    return augment(x, size, gen1), augment(x, size, gen2)
