"""Evaluation metrics accumulated over a whole set and reduced across processes."""
from .segmentation import ConfusionMatrix

__all__ = ['ConfusionMatrix']
