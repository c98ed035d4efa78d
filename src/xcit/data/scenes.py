"""`digit_scenes`: a built-in dataset for detection and segmentation, made from scikit-learn's digits.

Each scene is a canvas of 128-256 pixels a side (any aspect ratio) on a textured
background, with 1-6 handwritten digits pasted at random scales, positions and colours.
Its targets are those of torchvision's detection models plus a semantic map:
`boxes` (XYXY, tight around each digit's visible pixels), `labels` (digit + 1; 0 is the
background), `masks` (one per digit, what is visible after later digits cover it) and
`semantic` (the label of each pixel's topmost digit, else 0). Scenes are a pure function
of (seed, split, index), and the train and val scenes draw from the disjoint train and
val digits of `digits_split`. Nothing is downloaded.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

from .datasets import digits_split

NUM_CLASSES = 11  # background + the ten digits
CLASSES = ('background', *map(str, range(10)))


class DigitScenes(torch.utils.data.Dataset):
    """`length` scenes of `split` ('train' or 'val'); item i is (image (3, H, W) float in [0, 1], target)."""

    def __init__(self, split: str = 'train', length: int = 512, seed: int = 0, min_side: int = 128,
                 max_side: int = 256, max_digits: int = 6, digit_sizes: tuple[int, int] = (20, 72),
                 transforms=None):
        if not 8 <= min_side <= max_side <= 4096:
            raise ValueError(f'digit_scenes: need 8 <= min_side <= max_side <= 4096, got {min_side}, {max_side}')
        if not 8 <= digit_sizes[0] <= digit_sizes[1] <= min_side:
            raise ValueError(f'digit_scenes: digit sizes {digit_sizes} must lie in [8, min_side={min_side}]')
        if not 1 <= max_digits <= 64:
            raise ValueError(f'digit_scenes: max_digits must be 1 to 64, not {max_digits}')
        images, targets, self.source_indices = digits_split(split)
        self.digits = torch.from_numpy(images / 16.0).float()  # (n, 8, 8) in [0, 1]
        self.digit_labels = torch.from_numpy(targets).long()
        self.split, self.length, self.seed = split, length, seed
        self.min_side, self.max_side, self.max_digits, self.digit_sizes = min_side, max_side, max_digits, digit_sizes
        self.transforms = transforms
        self.classes = CLASSES

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(f'digit_scenes has {self.length} scenes, not index {index}')
        g = item_generator(self.seed, self.split, index)
        rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
        randint = lambda low, high: int(torch.randint(low, high + 1, (1,), generator=g))  # noqa: E731
        H, W = randint(self.min_side, self.max_side), randint(self.min_side, self.max_side)
        image = textured_background(H, W, g)  # (3, H, W)
        owner = torch.full((H, W), -1, dtype=torch.long)  # which pasted digit each pixel shows
        labels, sources, placed = [], [], []
        for _ in range(randint(1, self.max_digits)):
            which = randint(0, len(self.digits) - 1)
            side = randint(*self.digit_sizes)
            h = max(8, min(H, round(side * (0.8 + 0.4 * float(rand(1))))))  # a little stretch, either way
            w = max(8, min(W, side))
            ink = F.interpolate(self.digits[which][None, None], size=(h, w), mode='bicubic',
                                align_corners=False)[0, 0]
            ink = ((ink - 0.3) * 2.5).clamp(0, 1)  # (h, w): crisper strokes than the 8x8 source's blur
            for _ in range(8):  # a digit may hide at most a third of another's frame: the scene stays legible
                top, left = randint(0, H - h), randint(0, W - w)
                if all(_overlap((top, left, h, w), other) <= min(h * w, other[2] * other[3]) / 3 for other in placed):
                    break
            else:
                continue  # no room left for it
            placed.append((top, left, h, w))
            colour = contrasting_colour(image[:, top:top + h, left:left + w], g)  # (3,)
            alpha = ink[None]
            patch = image[:, top:top + h, left:left + w]
            image[:, top:top + h, left:left + w] = patch * (1 - alpha) + colour[:, None, None] * alpha
            owner[top:top + h, left:left + w][ink > 0.5] = len(labels)
            labels.append(int(self.digit_labels[which]) + 1)
            sources.append(int(self.source_indices[which]))
        masks = torch.stack([owner == i for i in range(len(labels))])  # (N, H, W): what each digit still shows
        keep = masks.flatten(1).sum(1) >= 4  # a digit covered (almost) completely by later ones is dropped
        masks, labels = masks[keep], torch.tensor(labels, dtype=torch.long)[keep]
        sources = torch.tensor(sources, dtype=torch.long)[keep]
        semantic = torch.zeros(H, W, dtype=torch.long)
        for mask, label in zip(masks, labels):
            semantic[mask] = label
        target = {
            'boxes': tv_tensors.BoundingBoxes(masks_to_boxes(masks), format='XYXY', canvas_size=(H, W)),
            'labels': labels,
            'masks': tv_tensors.Mask(masks.to(torch.uint8)),
            'semantic': tv_tensors.Mask(semantic),
            'image_id': index,
            'digit_index': sources,  # each instance's index in scikit-learn's digits
        }
        image = tv_tensors.Image(image.clamp(0, 1))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def item_generator(seed: int, split: str, index: int) -> torch.Generator:
    """The generator that draws item `index` of a built-in split: a function of (seed, split, index) only, not of
    workers, ranks, the order of reading or the process."""
    state = np.random.SeedSequence([seed, ('train', 'val').index(split), index]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) masks -> (N, 4) XYXY boxes in pixel-edge coordinates: x2 and y2 one past the last pixel."""
    if masks.numel() == 0:
        return torch.zeros(0, 4)
    rows, cols = masks.any(2), masks.any(1)  # (N, H), (N, W)
    h_idx = torch.arange(masks.shape[1]).expand_as(rows)
    w_idx = torch.arange(masks.shape[2]).expand_as(cols)
    y1 = torch.where(rows, h_idx, masks.shape[1]).min(1).values
    y2 = torch.where(rows, h_idx, -1).max(1).values + 1
    x1 = torch.where(cols, w_idx, masks.shape[2]).min(1).values
    x2 = torch.where(cols, w_idx, -1).max(1).values + 1
    return torch.stack([x1, y1, x2, y2], 1).float()


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Pixels shared by two (top, left, height, width) rectangles."""
    rows = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    cols = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(rows, 0) * max(cols, 0)


def textured_background(H: int, W: int, g: torch.Generator) -> torch.Tensor:
    """A muted background: smooth blotches of one hue from a coarse random grid, plus fine grain."""
    cells = int(torch.randint(2, 9, (1,), generator=g))
    hue = torch.rand(3, 1, 1, generator=g)
    shade = torch.rand(1, 1, cells, cells, generator=g) * 0.5 + 0.25  # brightness varies, the hue barely
    coarse = shade * (0.7 + 0.3 * hue) + 0.1 * torch.rand(1, 3, cells, cells, generator=g)
    smooth = F.interpolate(coarse, size=(H, W), mode='bicubic', align_corners=False)[0]
    grain = (torch.rand(1, H, W, generator=g) - 0.5) * 0.08
    return (smooth + grain).clamp(0, 1)


def contrasting_colour(patch: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random colour at least 0.35 away in mean brightness from what it is painted on."""
    base = float(patch.mean())
    for _ in range(8):
        colour = torch.rand(3, generator=g)
        if abs(float(colour.mean()) - base) >= 0.35:
            return colour
    return torch.full((3,), 0.0 if base > 0.5 else 1.0)
