"""What the commands share: a model built for a checkpoint given on the command line, and one-line errors."""
from __future__ import annotations

import sys
from typing import Any

import torch.nn as nn

MAX_MESSAGE_CHARS = 2000


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A possibly multi-line error message (a checkpoint's list of missing keys) as one line of bounded length."""
    text = ''
    for line in filter(None, (part.strip() for part in str(message).splitlines())):
        if text:
            text += ' ' if text.endswith(':') else '; '
        text += line
    return text if len(text) <= limit else text[:limit] + '...'


def error(command: str, message: object) -> None:
    """Report a problem on one stderr line, the way every command does."""
    print(f'xcit {command}: error: {one_line(str(message))}', file=sys.stderr, flush=True)


def report_problems(command: str, inputs: list[tuple[Any, str | None]]) -> int:
    """One error line per (input, problem) pair that has a problem; how many had one."""
    problems = [problem for _, problem in inputs if problem is not None]
    for problem in problems:
        error(command, problem)
    return len(problems)


def class_names(raw) -> list[str] | None:
    """The class names a training checkpoint stores (its classification task's state; at the top level in
    checkpoints of format version 1), when they are strings."""
    if not isinstance(raw, dict):
        return None
    classes = raw['task'].get('classes') if isinstance(raw.get('task'), dict) else raw.get('classes')
    if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
        return list(classes)
    return None


def run_config(raw: Any, source: str):
    """The run config a training checkpoint stores, validated; None when the checkpoint has none."""
    from ..config import validate_config
    if not isinstance(raw, dict) or 'config' not in raw:
        return None
    return validate_config(raw['config'], f'{source} (its stored run config)')


def model_with_weights(name: str, checkpoint: str | None) -> tuple[nn.Module, Any]:
    """`create_model(name)` with the checkpoint's weights, and the checkpoint's contents (None without one).

    The class count comes from the weights; a training checkpoint also supplies
    its run's model arguments (e.g. a reduced depth). A Hub repo or folder
    (`hf-hub:ORG/REPO`, `local-dir:DIR`) brings its own weights when no checkpoint is given.
    """
    from ..checkpoints import load_into, read_checkpoint
    from ..checkpoints.hf_hub import split_source
    from ..checkpoints.load import extract_state_dict, guess_weights
    from ..factory import create_model
    from ..registry import get_model_entry

    from_hub = split_source(name)[0] is not None
    if not from_hub:
        get_model_entry(name)  # an unknown name fails before a large checkpoint is read
    if checkpoint is None:
        return create_model(name, pretrained=from_hub).eval(), None
    raw = read_checkpoint(checkpoint)
    state_dict = extract_state_dict(raw, source=checkpoint)
    config = run_config(raw, checkpoint)
    # a dense model's backbone weights are in the checkpoint: its start (`backbone_checkpoint`) is not read
    kwargs = {k: v for k, v in (config.model.kwargs if config is not None else {}).items()
              if k != 'backbone_checkpoint'}
    guess = guess_weights(state_dict)
    classes = class_names(raw)
    num_classes = guess.num_classes if guess else len(classes) if classes else None
    try:
        model = create_model(name, num_classes=num_classes, **kwargs)
    except TypeError as e:  # the stored model arguments do not fit this architecture
        raise ValueError(f'{checkpoint}: its run config has model arguments {name} does not take ({e})') from None
    load_into(model, state_dict, source=checkpoint)
    return model.eval(), raw
