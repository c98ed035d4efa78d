"""Dense prediction over this package's backbones: detection and instance segmentation on torchvision."""
from .detection import PyramidBackbone, build_detector

__all__ = ['PyramidBackbone', 'build_detector']
