"""DINO's multi-crop augmentation: two global crops and N local ones of each image (`collate` stacks them crop by crop).

A source may give several draws of one sample instead of one image (`dino.renders_per_sample`):
crop k is then taken from draw k mod n, so the two global crops see two photos of one object.

The recipe of facebookresearch/dino's DataAugmentationDINO, through torchvision: random
resized crops (global scale 0.4-1, local 0.05-0.4), flip, colour jitter (0.4, 0.4, 0.2, 0.1)
with p 0.8, grayscale with p 0.2, Gaussian blur (p 1.0 / 0.1 / 0.5 for global 1 / global 2
/ local) and solarisation of the second global crop (p 0.2). Every draw comes from torch's
generator, which the dataset seeds per (epoch, sample), so crops are reproducible.
"""
from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T


class RandomBlur:
    """PIL's Gaussian blur with probability `p` and a radius uniform in `radius` (DINO's GaussianBlur)."""

    def __init__(self, p: float, radius: tuple[float, float] = (0.1, 2.0)):
        self.p, self.radius = p, radius

    def __call__(self, image: Image.Image) -> Image.Image:
        if float(torch.rand(1)) >= self.p:
            return image
        low, high = self.radius
        return image.filter(ImageFilter.GaussianBlur(radius=low + (high - low) * float(torch.rand(1))))


class MultiCropTransform:
    """image -> [global 1, global 2, local 1, ..., local N], normalised (3, size, size) tensors."""

    def __init__(self, global_size: int, local_size: int, local_crops: int, global_scale=(0.4, 1.0),
                 local_scale=(0.05, 0.4), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), hflip: float = 0.5,
                 blur_radius=(0.1, 2.0), solarize_threshold: int = 128):
        bicubic = T.InterpolationMode.BICUBIC
        shared = [T.RandomHorizontalFlip(p=hflip),
                  T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                  T.RandomGrayscale(p=0.2)]
        to_tensor = [T.ToTensor(), T.Normalize(mean, std)]
        crop = lambda size, scale: T.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic)  # noqa: E731
        self.global_1 = T.Compose([crop(global_size, global_scale), *shared, RandomBlur(1.0, blur_radius), *to_tensor])
        self.global_2 = T.Compose([crop(global_size, global_scale), *shared, RandomBlur(0.1, blur_radius),
                                   T.RandomSolarize(solarize_threshold, p=0.2), *to_tensor])
        self.local = T.Compose([crop(local_size, local_scale), *shared, RandomBlur(0.5, blur_radius), *to_tensor])
        self.local_crops = local_crops

    def __call__(self, image: Image.Image | list[Image.Image]) -> list[torch.Tensor]:
        """One image, or several draws of one sample: crop k then comes from draw k mod n."""
        draws = image if isinstance(image, list) else [image]
        draw = lambda k: draws[k % len(draws)]  # noqa: E731
        return [self.global_1(draw(0)), self.global_2(draw(1)),
                *(self.local(draw(2 + j)) for j in range(self.local_crops))]
