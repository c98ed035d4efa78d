"""Model registry: architecture names, their pretrained weight tags, and each family's checkpoint adapter.

It imports nothing else of the package, so `models` (which registers into it)
and `checkpoints` (which asks it how to read a family's weights) both depend on
it and never on each other's internals.

Names follow timm: `<architecture>.<tag>`, where the tag names a weight source
(`xcit_small_12_p16_224.fb_dist_in1k`). The first tag registered for an
architecture is its default.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch.nn as nn

ModelBuilder = Callable[..., nn.Module]

# the normalisation every released model here was trained with: models' cfgs and the data defaults read it here
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class WeightsGuess:
    """What a state dict's shapes say about the model that wrote it."""
    architecture: str | None  # a registered name, or None when no registered size fits
    num_classes: int
    description: str  # e.g. 'embed_dim 192, depth 12, 4 heads, patch 16, 1000 classes'


@dataclass(frozen=True)
class CheckpointAdapter:
    """A family's knowledge of foreign checkpoint layouts.

    `filter_fn(state_dict, model)` maps other layouts (timm's, ...) onto ours;
    `guess_fn(state_dict)` recognises the family's weights (None if they are not);
    `timm_fn(state_dict)` writes ours in timm's layout, where timm has the family;
    `passl_fn(state_dict)` renames ours to the module names of PASSL's port, where PASSL has the family.
    """
    filter_fn: Callable[[dict, nn.Module], dict]
    guess_fn: Callable[[dict], WeightsGuess | None]
    timm_fn: Callable[[dict], dict] | None = None
    passl_fn: Callable[[dict], dict] | None = None


@dataclass
class ModelEntry:
    name: str
    builder: ModelBuilder
    family: str
    cfgs: dict[str, dict] = field(default_factory=dict)  # tag -> pretrained cfg; insertion order, default first


_MODELS: dict[str, ModelEntry] = {}
_ALIASES: dict[str, str] = {}  # deprecated names -> `arch.tag`
_ADAPTERS: dict[type | str, CheckpointAdapter] = {}  # by class, or by 'module.QualName' for another library's


def register_model(name: str, builder: ModelBuilder, family: str, cfgs: dict[str, dict]) -> None:
    if name in _MODELS:
        raise ValueError(f'model {name!r} is already registered')
    _MODELS[name] = ModelEntry(name, builder, family, dict(cfgs))


def register_alias(old_name: str, new_name: str) -> None:
    _ALIASES[old_name] = new_name


def register_checkpoint_adapter(model_classes: Iterable[type | str], adapter: CheckpointAdapter) -> None:
    """`adapter` for these classes; another library's class can be named ('timm.models.regnet.RegNet'),
    so that registering does not import that library."""
    for cls in model_classes:
        _ADAPTERS[cls] = adapter


def get_checkpoint_adapter(model: nn.Module) -> CheckpointAdapter | None:
    for cls in type(model).__mro__:
        for key in (cls, f'{cls.__module__}.{cls.__qualname__}'):
            if key in _ADAPTERS:
                return _ADAPTERS[key]
    return None


def guess_architecture(state_dict: dict) -> WeightsGuess | None:
    """Ask every family whether the state dict (in its own layout) is one of its models."""
    for adapter in dict.fromkeys(_ADAPTERS.values()):
        guess = adapter.guess_fn(state_dict)
        if guess is not None:
            return guess
    return None


def split_model_name(name: str) -> tuple[str, str]:
    """'arch.tag' -> ('arch', 'tag'); a name without a tag gets ''. Deprecated names resolve to their new form."""
    name = _ALIASES.get(name, name)
    arch, _, tag = name.partition('.')
    return arch, tag


def get_model_entry(name: str) -> ModelEntry:
    arch, tag = split_model_name(name)
    if arch not in _MODELS:
        close = fnmatch.filter(_MODELS, f'*{arch[:12]}*')[:5]
        hint = f" Similar names: {', '.join(close)}." if close else " See xcit.list_models()."
        raise ValueError(f'Unknown model {name!r}.{hint}')
    entry = _MODELS[arch]
    if tag and tag not in entry.cfgs:
        known = ', '.join(entry.cfgs) or 'none'
        raise ValueError(f'{arch!r} has no pretrained tag {tag!r}; its tags: {known}.')
    return entry


def get_pretrained_cfg(name: str) -> dict:
    """The pretrained cfg for `arch.tag`, or the architecture's default tag."""
    entry = get_model_entry(name)
    _, tag = split_model_name(name)
    tag = tag or next(iter(entry.cfgs), '')
    cfg = dict(entry.cfgs.get(tag, {}))
    cfg.update(architecture=entry.name, tag=tag)
    return cfg


def build_model(name: str, pretrained_cfg_overlay: dict | None = None, pretrained_cfg: dict | None = None,
                **kwargs) -> nn.Module:
    """The architecture `name` with freshly initialised weights and its pretrained cfg attached.

    Keyword arguments that are None are left to the builder's defaults, except `num_classes`, which comes
    from the weights' cfg (0 for a tag of backbones, such as `.dino`); `xcit.create_model` adds weights.
    `pretrained_cfg` replaces the registry's cfg (weights described elsewhere: a Hub repo's config.json).
    """
    entry = get_model_entry(name)
    cfg = dict(pretrained_cfg, architecture=entry.name) if pretrained_cfg is not None else get_pretrained_cfg(name)
    overlay = pretrained_cfg_overlay or {}
    if 'url' in overlay:  # the Hub repo and the published accuracy are the registry's weights', not the URL's
        for key in {'hf_hub_id', 'top1', 'top1_source'} - overlay.keys():
            cfg.pop(key, None)
    cfg.update(overlay)
    if kwargs.get('num_classes') is None and 'num_classes' in cfg:
        kwargs['num_classes'] = cfg['num_classes']
    model = entry.builder(**{k: v for k, v in kwargs.items() if v is not None})
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def is_model(name: str) -> bool:
    try:
        get_model_entry(name)
    except ValueError:
        return False
    return True


def list_models(
        filter: str | Iterable[str] = '',
        pretrained: bool = False,
        exclude_filters: str | Iterable[str] = (),
        family: str | None = None,
) -> list[str]:
    """Registered names matching fnmatch wildcards, as in timm.

    With `pretrained=True` the result lists `arch.tag` names, one per published weight file.
    """
    filters = [filter] if isinstance(filter, str) else list(filter)
    excludes = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    names = []
    for entry in _MODELS.values():
        if family and entry.family != family:
            continue
        if pretrained:
            names.extend(f'{entry.name}.{tag}' for tag, cfg in entry.cfgs.items() if cfg.get('url'))
        else:
            names.append(entry.name)
    if any(filters):
        names = [n for n in names if any(fnmatch.fnmatch(n, f) or fnmatch.fnmatch(n.partition('.')[0], f)
                                         for f in filters if f)]
    if excludes:
        names = [n for n in names if not any(fnmatch.fnmatch(n, f) for f in excludes)]
    return names
