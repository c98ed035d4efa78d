"""Pictures of what a model does: attention maps."""
from .attention import AttentionMaps, attention_maps, plot_attention

__all__ = ['AttentionMaps', 'attention_maps', 'plot_attention']
