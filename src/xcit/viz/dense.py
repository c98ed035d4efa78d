"""Pictures of dense predictions: boxes, labels, scores and translucent masks over the image, or the
colour-coded segmentation beside it (torchvision's drawing utilities)."""
from __future__ import annotations

import colorsys

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours by class, the background (class 0) black: hues spread by the golden ratio."""
    colours = [(0, 0, 0)]
    for i in range(1, num_classes):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0)
        colours.append((round(255 * r), round(255 * g), round(255 * b)))
    return colours


def _uint8(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8) if image.is_floating_point() else image


def draw_detections(image: torch.Tensor, detections: dict, classes: list[str] | None = None,
                    score_threshold: float = 0.5, mask_alpha: float = 0.45) -> torch.Tensor:
    """(3, H, W) image in [0, 1] and one torchvision detection dict -> (3, H, W) uint8 picture of the detections
    scoring at least `score_threshold`, each labelled 'class score'."""
    keep = detections['scores'] >= score_threshold
    labels = detections['labels'][keep].tolist()
    colours = palette(max(labels, default=0) + 1 if not classes else len(classes))
    picture = _uint8(image)
    if 'masks' in detections and keep.any():
        masks = detections['masks'][keep]
        masks = masks[:, 0] > 0.5 if masks.dim() == 4 else masks.bool()
        picture = draw_segmentation_masks(picture, masks, alpha=mask_alpha, colors=[colours[c] for c in labels])
    names = [f'{classes[c] if classes and c < len(classes) else c} {s:.2f}'
             for c, s in zip(labels, detections['scores'][keep].tolist())]
    if names:
        picture = draw_bounding_boxes(picture, detections['boxes'][keep], labels=names, width=2,
                                      colors=[colours[c] for c in labels])
    return picture


def draw_segmentation(image: torch.Tensor, classes_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(3, H, W) image and (H, W) class map -> (3, H, 2W + 8) uint8: the image, then the classes coloured."""
    colours = torch.tensor(palette(num_classes), dtype=torch.uint8)  # (K, 3)
    coloured = colours[classes_map.clamp(0, num_classes - 1)].permute(2, 0, 1)  # (3, H, W)
    picture = _uint8(image)
    gap = torch.full((3, picture.shape[1], 8), 255, dtype=torch.uint8)
    return torch.cat([picture, gap, coloured], dim=2)
