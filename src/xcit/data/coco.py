"""COCO-format detection data: a json of images, categories and annotations (boxes, polygon or RLE masks,
`iscrowd`) over a folder of images, read through pycocotools.

Items are what torchvision's detectors train on: a (3, H, W) image in [0, 1] and `boxes` (XYXY,
pixel edges), `labels` (1..K, contiguous in category-id order; 0 is the background), `masks`,
`iscrowd`, `image_id` (the json's). `category_ids[label]` maps a label back to the json's id.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch
from torchvision import tv_tensors

from ..config import ConfigError


class CocoDetection(torch.utils.data.Dataset):
    def __init__(self, image_root: str | os.PathLike, ann_file: str | os.PathLike, transforms=None,
                 masks: bool = True):
        from pycocotools.coco import COCO
        self.image_root, self.ann_file = Path(image_root), Path(ann_file)
        if not self.ann_file.is_file():
            raise ConfigError(f'COCO annotations not found: {self.ann_file}')
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it loads
                self.coco = COCO(str(self.ann_file))
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise ConfigError(f'{self.ann_file}: not a COCO annotation file ({type(e).__name__}: {e})') from None
        self.ids = sorted(self.coco.imgs)
        self.category_ids = [0] + sorted(self.coco.cats)  # label -> category id; 0: the background
        self.label_of = {cat: label for label, cat in enumerate(self.category_ids) if label}
        self.classes = ['background'] + [self.coco.cats[c]['name'] for c in self.category_ids[1:]]
        self.transforms, self.masks = transforms, masks

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self, index: int) -> str:
        return str(self.image_root / self.coco.imgs[self.ids[index]]['file_name'])

    def __getitem__(self, index: int):
        from torchvision.transforms.v2.functional import pil_to_tensor

        from .datasets import read_image
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = pil_to_tensor(read_image(self.image_root / info['file_name'])).float() / 255  # (3, H, W)
        H, W = image.shape[-2:]
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
                if a['bbox'][2] > 0 and a['bbox'][3] > 0]
        boxes = torch.tensor([a['bbox'] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
        target = {
            'boxes': tv_tensors.BoundingBoxes(boxes, format='XYXY', canvas_size=(H, W)),
            'labels': torch.tensor([self.label_of[a['category_id']] for a in anns], dtype=torch.long),
            'iscrowd': torch.tensor([a.get('iscrowd', 0) for a in anns], dtype=torch.long),
            'image_id': image_id,
        }
        if self.masks:
            masks = [torch.from_numpy(self.coco.annToMask(a)) for a in anns if 'segmentation' in a]
            if len(masks) != len(anns):
                raise ValueError(f'{self.ann_file}: image {image_id} has annotations without a segmentation')
            target['masks'] = tv_tensors.Mask(torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.uint8))
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def ground_truth(self) -> dict:
        """The annotation file's contents, as COCOeval scores against."""
        return self.coco.dataset
