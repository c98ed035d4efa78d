"""Evaluation metrics accumulated over a whole set and reduced across processes."""
from .coco import CocoEvaluator, coco_ground_truth
from .segmentation import ConfusionMatrix

__all__ = ["CocoEvaluator", "ConfusionMatrix", "coco_ground_truth"]
