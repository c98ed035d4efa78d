"""xcit: cross-covariance image transformers for PyTorch."""
from .checkpoints import CheckpointError, load_checkpoint, push_to_hub, read_checkpoint, save_pretrained
from .factory import create_model
from . import passl_config  # noqa: F401  (PASSL's YAML configs are read as ours)
from . import dense  # noqa: F401  (registers maskrcnn_*, semfpn_*, upernet_*)
from .models import CvT, FCViT, XCiT, XCiTDense, convert_sync_batchnorm, optimize_for_inference
from .registry import get_pretrained_cfg, is_model, list_models

__version__ = '0.1.0'

__all__ = [
    'CheckpointError', 'CvT', 'FCViT', 'XCiT', 'XCiTDense', 'convert_sync_batchnorm', 'create_model', 'get_pretrained_cfg',
    'is_model', 'list_models', 'load_checkpoint', 'optimize_for_inference', 'push_to_hub', 'read_checkpoint',
    'save_pretrained',
]
