"""xcit: cross-covariance image transformers for PyTorch."""
from .checkpoints import CheckpointError, load_checkpoint, read_checkpoint
from .models import (CvT, FCViT, XCiT, XCiTDense, convert_sync_batchnorm, create_model, get_pretrained_cfg,
                     is_model, list_models, optimize_for_inference)

__version__ = '0.1.0'

__all__ = [
    'CheckpointError', 'CvT', 'FCViT', 'XCiT', 'XCiTDense', 'convert_sync_batchnorm', 'create_model', 'get_pretrained_cfg',
    'is_model', 'list_models', 'load_checkpoint', 'optimize_for_inference', 'read_checkpoint',
]
