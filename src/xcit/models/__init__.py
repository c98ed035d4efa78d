"""Model families: the maths, registered by name in `xcit.registry` (build them with `xcit.create_model`)."""
from . import cvt, fcvit, xcit  # register their variants
from .cvt import CvT, CvTFeatures, cvt_from_spec
from .fcvit import FCViT, FCViTFeatures
from .fastpath import PATHS, FastPathModule, default_fast_path, fast_path_decisions, get_fast_path, set_fast_path
from .optimize import compile_static, fold_batchnorm, optimize_for_inference
from .sync_bn import convert_sync_batchnorm
from .xcit import XCiT, XCiTDense

__all__ = [
    'PATHS', 'CvT', 'CvTFeatures', 'FCViT', 'FCViTFeatures', 'FastPathModule', 'XCiT', 'XCiTDense',
    'compile_static', 'convert_sync_batchnorm', 'cvt_from_spec', 'default_fast_path', 'fast_path_decisions', 'fold_batchnorm',
    'get_fast_path', 'optimize_for_inference', 'set_fast_path',
]
