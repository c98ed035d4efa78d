"""Downloading published weights into torch.hub's cache."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch

from .errors import CheckpointError


class PretrainedUnavailableError(CheckpointError):
    """Published weights could not be fetched; the message says how to pass a local copy instead."""


def cached_download(url: str, model_name: str, progress: bool = True) -> Path:
    """Path of the file behind `url` in `<torch hub dir>/checkpoints/`, downloading it the first time.

    `model_name` is `arch.tag`; files whose name does not say which model they hold are cached under it.
    """
    filename = os.path.basename(urlparse(url).path)
    if model_name.partition('.')[0] not in filename:
        # generic names (a hub's pytorch_model.bin) would make two models share one cache file
        filename = f'{model_name}-{filename}'
    cache_dir = Path(torch.hub.get_dir()) / 'checkpoints'
    target = cache_dir / filename
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        # writes to a temporary file and renames it, so an interrupted download never looks complete
        torch.hub.download_url_to_file(url, str(target), progress=progress)
    except (URLError, OSError, ValueError) as e:
        reason = getattr(e, 'reason', None) or e
        raise PretrainedUnavailableError(
            f"could not download the weights of {model_name} from {url} ({reason}).\n"
            f"Without network access, fetch that file on another machine and either pass it with "
            f"create_model('{model_name}', checkpoint_path='/path/to/{filename}') or copy it to {target}."
        ) from None
    return target
