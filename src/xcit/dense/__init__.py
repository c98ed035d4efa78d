"""Dense prediction over this package's backbones: detection and instance segmentation on torchvision,
semantic segmentation with Semantic FPN and UperNet; their registered names (`maskrcnn_xcit_*`,
`semfpn_xcit_*`, `upernet_xcit_*`) and backbone weights from any classification checkpoint.

The names register on import; torchvision's detection models load when first used.
"""
from importlib import import_module

from . import zoo  # noqa: F401  (registers the dense models)

_EXPORTS = dict(PyramidBackbone='detection', build_detector='detection', SemanticFPN='segmentation',
                UperNet='segmentation', build_segmenter='segmentation', BackboneLoad='weights',
                load_backbone_weights='weights')
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f'.{_EXPORTS[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
