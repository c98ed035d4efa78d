"""Run configuration: YAML files checked against a typed schema before anything runs.

A config file may name `_base_` files (a path or a list, relative to itself)
that it overrides key by key; several files given on the command line are
layered the same way, left to right; `-o a.b.c=value` overrides come last and
are parsed with `ast.literal_eval`. Unknown keys are errors that name the key
path and the closest valid key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import ast
import copy
import difflib
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending key or file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra='forbid', validate_assignment=True)


class ModelConfig(_Section):
    name: str = 'xcit_nano_12_p16_224'
    num_classes: int | None = Field(None, description='default: the number of classes in the training data')
    pretrained: bool = False
    checkpoint: str | None = Field(None, description='weights to start from, any supported format (like --load)')
    drop_path_rate: float | None = Field(None, ge=0, lt=1)
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra arguments for the model's constructor")


class DataConfig(_Section):
    dataset: Literal['imagefolder', 'labellist', 'digits'] = 'digits'
    root: str | None = Field(None, description='imagefolder: folder with the split folders; labellist: image root')
    train_split: str = Field('train', description='imagefolder: sub-folder; labellist: label file')
    val_split: str = Field('val', description='imagefolder: sub-folder; labellist: label file')
    image_size: int | None = Field(None, ge=8, description="default: the model's pretrained input size")
    batch_size: int = Field(64, ge=1, description='per process')
    eval_batch_size: int | None = Field(None, ge=1)
    num_workers: int = Field(2, ge=0)
    on_corrupt: Literal['skip', 'error'] = 'skip'
    interpolation: str | None = Field(None, description="default: the model's (bicubic for XCiT)")
    crop_pct: float | None = Field(None, gt=0, le=1)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    digits_size: int = Field(32, ge=8, description='digits: side the 8x8 images are upsampled to')


class AugmentConfig(_Section):
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = Field(0.5, ge=0, le=1)
    auto_augment: str | None = Field(None, description="timm policy string, e.g. 'rand-m9-mstd0.5-inc1'")
    color_jitter: float | None = None
    reprob: float = Field(0.0, ge=0, le=1, description='random erasing probability')
    remode: Literal['const', 'rand', 'pixel'] = 'pixel'
    recount: int = Field(1, ge=1)
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)
    mixup_prob: float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    mixup_mode: Literal['batch', 'pair', 'elem'] = 'batch'
    smoothing: float = Field(0.1, ge=0, lt=1)
    repeated_aug: int = Field(1, ge=1, description='repeats of each image per epoch (DeiT/official recipe: 3)')


class OptimConfig(_Section):
    lr: float = Field(5e-4, gt=0)
    scale_lr: bool = Field(False, description='lr * global_batch / lr_base_batch (official recipe)')
    lr_base_batch: int = Field(512, ge=1)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    no_decay: Literal['official', 'passl'] = Field(
        'official', description='official: 1-D params, biases, cls token; passl: names containing no_decay_names')
    no_decay_names: list[str] = Field(default_factory=lambda: ['temperature', 'pos_embed', 'cls_token', 'dist_token'])
    clip_grad: float | None = Field(None, gt=0, description='max gradient norm')
    accum_steps: int = Field(1, ge=1)


class ScheduleConfig(_Section):
    epochs: int = Field(300, ge=1)
    warmup_epochs: float = Field(5, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(1e-5, ge=0)


class TrainConfig(_Section):
    device: str = Field('auto', description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1'")
    amp: Literal['none', 'bf16', 'fp16'] = 'none'
    ema: bool = False
    ema_decay: float = Field(0.99996, gt=0, lt=1)
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = Field(False, description='SyncBatchNorm in multi-GPU CUDA runs')
    freeze_bn: bool = Field(False, description='BatchNorm keeps its running statistics (eval mode) while training')
    checkpoint_interval: int = Field(0, ge=0, description='also write last.pth every N optimizer steps (0: per epoch)')
    keep_last: int = Field(3, ge=1, description='epoch checkpoints kept besides last.pth and best.pth')
    log_interval: int = Field(10, ge=1)
    eval_interval: int = Field(1, ge=1, description='evaluate every N epochs (and after the last)')
    tensorboard: bool = False
    progress: bool = True


class DistillConfig(_Section):
    type: Literal['none', 'hard', 'soft', 'dml'] = 'none'
    teacher: str = Field('regnety_160', description='a registered model, else a timm model name')
    teacher_weights: str | None = Field(None, description='weights file for the teacher, any supported format')
    teacher_pretrained: bool = False
    teacher_kwargs: dict[str, Any] = Field(default_factory=dict)
    alpha: float = Field(0.5, ge=0, le=1, description='weight of the distillation term (dml: of the KL term)')
    tau: float = Field(1.0, gt=0, description='soft: temperature')


class Config(_Section):
    experiment: str | None = Field(None, description='run folder name (default: the config file name)')
    output_dir: str = 'runs'
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @field_validator('experiment')
    @classmethod
    def _plain_name(cls, value):
        if value is not None and (not value or '/' in value or value in ('.', '..')):
            raise ValueError('must be a plain folder name')
        return value

    @model_validator(mode='after')
    def _consistent(self):
        mixing = self.augment.mixup > 0 or self.augment.cutmix > 0
        if mixing and self.augment.mixup_mode == 'batch' and self.data.batch_size % 2:
            raise ValueError(f'data.batch_size must be even with mixup/cutmix in batch mode (got {self.data.batch_size})')
        if self.data.dataset != 'digits' and not self.data.root:
            raise ValueError(f'data.root is required for the {self.data.dataset} dataset')
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode='json')


# --- loading -----------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f'config file not found: {path}')
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f'{path}: not valid YAML ({str(e).splitlines()[0]})') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: expected a mapping at the top level, found {type(data).__name__}')
    return data


def merge(base: dict, override: dict) -> dict:
    """Nested dicts merge key by key; any other value in `override` replaces the base's."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml_tree(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """A config file merged over its `_base_` files (recursively)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f'{path}: _base_ files include each other in a loop')
    data = _read_yaml(path)
    bases = data.pop('_base_', [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f'{path}: _base_ must be a file name or a list of them')
    merged: dict = {}
    for base in bases:
        merged = merge(merged, load_yaml_tree(path.parent / base, _seen + (path,)))
    return merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a', 'b', 'c'], value); values are Python literals, anything else a string."""
    key, sep, raw = text.partition('=')
    if not sep or not key.strip():
        raise ConfigError(f'override {text!r} is not of the form key.path=value')
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    if value == 'null':
        value = None
    return key.strip().split('.'), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[:path.index(part) + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _closest_key(loc: Sequence[str | int]) -> str | None:
    """The valid key nearest to a misspelled one, looked up in the schema section it appeared in."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, 'annotation', None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    matches = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.5)
    return '.'.join([*map(str, loc[:-1]), matches[0]]) if matches else None


def _explain(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        loc = [str(p) for p in item['loc']]
        key = '.'.join(loc) or '(top level)'
        if item['type'] == 'extra_forbidden':
            hint = _closest_key(loc)
            lines.append(f"unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else ''))
        else:
            got = item.get('input')
            shown = f' (got {got!r})' if not isinstance(got, dict) and got is not None else ''
            lines.append(f"'{key}': {item['msg']}{shown}" if loc else item['msg'])
    return f'{source}: ' + '; '.join(lines)


def load_config(paths: str | os.PathLike | Sequence[str | os.PathLike] = (), overrides: Sequence[str] = ()) -> Config:
    """Layer the config files (each over its `_base_`s), apply `-o` overrides, validate."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    data: dict = {}
    for path in paths:
        data = merge(data, load_yaml_tree(path))
    data = apply_overrides(data, overrides)
    if paths and 'experiment' not in data:
        data['experiment'] = Path(paths[-1]).stem
    source = ', '.join(str(p) for p in paths) or 'config'
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, source)) from None


def save_config(config: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
