"""Model families and the registry that names them."""
from . import xcit  # registers the XCiT variants
from ._factory import create_model
from ._registry import get_pretrained_cfg, is_model, list_models, split_model_name
from .sync_bn import convert_sync_batchnorm
from .xcit import XCiT, XCiTDense

__all__ = [
    'XCiT', 'XCiTDense', 'convert_sync_batchnorm', 'create_model', 'get_pretrained_cfg', 'is_model',
    'list_models', 'split_model_name',
]
