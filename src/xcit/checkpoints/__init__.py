"""Reading, converting and loading checkpoints from every supported source."""
from .convert import FORMATS, convert_checkpoint, extract_weights, save_state_dict
from .hub import PretrainedUnavailableError, cached_download
from .hf_hub import push_to_hub, save_pretrained
from .errors import CheckpointError, WriteError
from .io import atomic_write, read_checkpoint, sniff_format
from . import regnet  # noqa: F401  (registers the adapter for PASSL's RegNet teacher weights)
from .load import (LoadResult, extract_state_dict, load_checkpoint, load_into, load_state_dict, nonfinite_tensors,
                   read_state_dict)

__all__ = [
    'FORMATS', 'CheckpointError', 'LoadResult', 'PretrainedUnavailableError', 'WriteError', 'atomic_write',
    'cached_download', 'convert_checkpoint', 'extract_state_dict', 'extract_weights', 'load_checkpoint', 'load_into',
    'load_state_dict', 'nonfinite_tensors', 'push_to_hub', 'read_checkpoint', 'read_state_dict', 'save_pretrained',
    'save_state_dict', 'sniff_format',
]
