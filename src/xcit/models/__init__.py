"""Model families and the registry that names them."""
from . import cvt, fcvit, xcit  # register their variants
from ._factory import create_model
from ._registry import get_pretrained_cfg, is_model, list_models, split_model_name
from .cvt import CvT, CvTFeatures, cvt_from_spec
from .fcvit import FCViT, FCViTFeatures
from .optimize import compile_static, fold_batchnorm, optimize_for_inference
from .sync_bn import convert_sync_batchnorm
from .xcit import XCiT, XCiTDense

__all__ = [
    'CvT', 'CvTFeatures', 'FCViT', 'FCViTFeatures', 'XCiT', 'XCiTDense', 'convert_sync_batchnorm', 'create_model',
    'compile_static', 'cvt_from_spec', 'fold_batchnorm', 'get_pretrained_cfg', 'is_model', 'list_models', 'optimize_for_inference', 'split_model_name',
]
