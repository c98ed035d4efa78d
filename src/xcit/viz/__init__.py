"""Pictures of what a model does: attention maps, detections and segmentations."""
from .attention import AttentionMaps, attention_maps, plot_attention
from .dense import draw_detections, draw_segmentation, palette

__all__ = ['AttentionMaps', 'attention_maps', 'draw_detections', 'draw_segmentation', 'palette', 'plot_attention']
