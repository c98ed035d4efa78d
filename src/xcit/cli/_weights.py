"""Building a model for a checkpoint given on the command line."""
from __future__ import annotations

from typing import Any

import torch.nn as nn


def model_with_weights(name: str, checkpoint: str | None) -> tuple[nn.Module, Any]:
    """`create_model(name)` with the checkpoint's weights, and the checkpoint's contents (None without one).

    The class count comes from the weights; a training checkpoint also supplies
    its run's model arguments (e.g. a reduced depth).
    """
    from ..checkpoints import load_into, read_checkpoint
    from ..checkpoints.load import extract_state_dict
    from ..config import Config
    from ..factory import create_model
    from ..registry import guess_architecture

    if checkpoint is None:
        return create_model(name).eval(), None
    raw = read_checkpoint(checkpoint)
    state_dict = extract_state_dict(raw, source=checkpoint)
    kwargs = Config.model_validate(raw['config']).model.kwargs if isinstance(raw, dict) and 'config' in raw else {}
    guess = guess_architecture(state_dict)
    model = create_model(name, num_classes=guess.num_classes if guess else None, **kwargs)
    load_into(model, state_dict, source=checkpoint)
    return model.eval(), raw
