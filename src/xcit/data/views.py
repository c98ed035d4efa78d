"""Built-in views of scikit-learn's digits that raw pixels do not solve, for classification and pretraining.

`digit_views`: the digits seen as a camera might see them.

Each view is one digit on a `size`-pixel square canvas: the textured background of
`digit_scenes`, the digit in a random colour that contrasts with it, scaled to 45-90 %
of the canvas, stretched a little, rotated by up to 25 degrees and placed anywhere it
fits. A view is a pure function of (seed, split, index); index i shows digit i mod n
(n digits in the split), so `views` > 1 shows each digit several ways. Train and val
views draw from the disjoint digits of `digits_split`. Unlike the plain digits, where a
k-NN on raw pixels is right 98 % of the time, pixels say little here: colour, place and
background vary more than the class does, and features have to see past them.

Rendering costs more than a small model's step on a CPU, and every epoch and every
k-NN evaluation asks for the same views again, so each view is drawn once and kept
(up to `CACHE_BYTES` of pixels per process).

`digit_places`: each digit as `digits` draws it, white on black, half the canvas wide, at
one of 5 x 5 places one eighth of the canvas apart: a k-NN on pixels is right only when
a neighbour of the same class stands at the same place. With `renders=2` a training
sample is the digit drawn twice, at places drawn independently: two photos of one
object, which self-supervision can learn from where one image cannot (two crops of one
image share the place, and the shortcut wins).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .datasets import SampleSource, digit_images, digits_split
from .scenes import contrasting_colour, item_generator, textured_background

CACHE_BYTES = 256 << 20


class DigitViews(SampleSource):
    def __init__(self, split: str, size: int = 32, views: int = 1, seed: int = 0):
        if not 16 <= size <= 1024:
            raise ValueError(f'digit_views: size must be 16 to 1024 pixels, not {size}')
        if not 1 <= views <= 1000:
            raise ValueError(f'digit_views: views must be 1 to 1000, not {views}')
        images, targets, _ = digits_split(split)
        self.digits = torch.from_numpy(images / 16.0).float()  # (n, 8, 8) in [0, 1]
        self.targets = np.tile(targets, views).tolist()
        self.classes = [str(i) for i in range(10)]
        self.split, self.size, self.views, self.seed = split, size, views, seed
        self._rendered: dict[int, np.ndarray] = {}  # index -> (size, size, 3) uint8
        self._cache_limit = CACHE_BYTES // (3 * size * size)

    def __len__(self) -> int:
        return len(self.targets)

    def describe(self, index: int) -> str:
        return f'digit_views[{self.split}][{index}]'

    def load(self, index: int) -> Image.Image:
        pixels = self._rendered.get(index)
        if pixels is None:
            pixels = self._render(index)
            if len(self._rendered) < self._cache_limit:
                self._rendered[index] = pixels
        return Image.fromarray(pixels)  # PIL copies: a transform that draws into it leaves the kept view as it was

    def _render(self, index: int) -> np.ndarray:
        g = item_generator(self.seed, self.split, index)
        uniform = lambda low, high: low + (high - low) * float(torch.rand(1, generator=g))  # noqa: E731
        S = self.size
        canvas = textured_background(S, S, g)  # (3, S, S)
        side = uniform(0.45, 0.9) * S
        h, w = side * uniform(0.85, 1.15), side * uniform(0.6, 0.8)  # digits are taller than wide
        angle = math.radians(uniform(-25, 25))
        c, s = abs(math.cos(angle)), abs(math.sin(angle))
        fit = min(1.0, S / (h * c + w * s + 1), S / (w * c + h * s + 1))  # the turned frame stays on the canvas
        h, w = max(4, round(h * fit)), max(4, round(w * fit))
        ink = F.interpolate(self.digits[index % len(self.digits)][None, None], size=(h, w), mode='bicubic',
                            align_corners=False)
        ink = ((ink - 0.3) * 2.5).clamp(0, 1)  # (1, 1, h, w): crisp strokes
        ink = _rotate(ink, angle)[0, 0]  # (h', w'): the turned frame
        ih, iw = ink.shape
        top, left = int(torch.randint(0, S - ih + 1, (1,), generator=g)), int(torch.randint(0, S - iw + 1, (1,), generator=g))
        patch = canvas[:, top:top + ih, left:left + iw]
        colour = contrasting_colour(patch, g)
        canvas[:, top:top + ih, left:left + iw] = patch * (1 - ink) + colour[:, None, None] * ink
        return (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


class DigitPlaces(SampleSource):
    PLACES = 5  # per axis; the digit fills half the canvas, the places are a quarter of that apart

    def __init__(self, split: str, size: int = 64, views: int = 1, seed: int = 0, renders: int = 1):
        if not 16 <= size <= 1024 or size % 8:
            raise ValueError(f'digit_places: size must be a multiple of 8 from 16 to 1024 pixels, not {size}')
        if not 1 <= views <= 1000:
            raise ValueError(f'digit_places: views must be 1 to 1000, not {views}')
        if not 1 <= renders <= 64:
            raise ValueError(f'digit_places: renders must be 1 to 64, not {renders}')
        images, targets, _ = digits_split(split)
        self.digits = digit_images(images, size // 2)  # (n, size/2, size/2) uint8
        self.targets = np.tile(targets, views).tolist()
        self.classes = [str(i) for i in range(10)]
        self.split, self.size, self.seed, self.renders = split, size, seed, renders

    def describe(self, index: int) -> str:
        return f'digit_places[{self.split}][{index}]'

    def load(self, index: int) -> Image.Image | list[Image.Image]:
        """One view at the place of (seed, split, index); with `renders` > 1, that many at places drawn from
        torch's generator, which the dataset seeds per (epoch, sample)."""
        if self.renders == 1:
            place = torch.randint(self.PLACES, (2,), generator=item_generator(self.seed, self.split, index))
            return self._render(index, place)
        return [self._render(index, torch.randint(self.PLACES, (2,))) for _ in range(self.renders)]

    def _render(self, index: int, place: torch.Tensor) -> Image.Image:
        step, side = self.size // 8, self.size // 2
        top, left = (place * step).tolist()
        canvas = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        canvas[top:top + side, left:left + side] = self.digits[index % len(self.digits), :, :, None]
        return Image.fromarray(canvas)


def _rotate(ink: torch.Tensor, angle: float) -> torch.Tensor:
    """(1, 1, h, w) rotated by `angle` radians about its centre into the frame that holds all of it."""
    _, _, h, w = ink.shape
    c, s = math.cos(angle), math.sin(angle)
    H, W = math.ceil(abs(h * c) + abs(w * s)), math.ceil(abs(w * c) + abs(h * s))
    # output pixel (x, y) in [-1, 1] of the big frame samples the input at R^-1 (x, y), rescaled to its frame
    theta = torch.tensor([[c * W / w, s * H / w, 0.0], [-s * W / h, c * H / h, 0.0]])[None]
    grid = F.affine_grid(theta, (1, 1, H, W), align_corners=False)
    return F.grid_sample(ink, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
