"""Dense prediction over this package's backbones: detection and instance segmentation on torchvision,
semantic segmentation with Semantic FPN."""
from .detection import PyramidBackbone, build_detector
from .segmentation import SemanticFPN, build_segmenter

__all__ = ['PyramidBackbone', 'SemanticFPN', 'build_detector', 'build_segmenter']
