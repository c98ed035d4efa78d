"""Reading, converting and loading checkpoints from every supported source."""
from .hub import PretrainedUnavailableError, cached_download
from .io import CheckpointError, read_checkpoint, sniff_format
from .load import LoadResult, extract_state_dict, load_checkpoint, load_state_dict

__all__ = [
    'CheckpointError', 'LoadResult', 'PretrainedUnavailableError', 'cached_download', 'extract_state_dict',
    'load_checkpoint', 'load_state_dict', 'read_checkpoint', 'sniff_format',
]
