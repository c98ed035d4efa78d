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
import logging
import os
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)


_logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending key or file."""


# Bounds on what a config may hold, far beyond any real one: a YAML alias bomb or a runaway
# value is refused before it is expanded, copied or quoted in a message.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 32
MAX_QUOTED_CHARS = 200
# one batch of float32 input images per process: 16 GiB is 85 images at 4096 x 4096 or 28,000 at 224 x 224
MAX_BATCH_BYTES = 16 << 30

_quote_repr = reprlib.Repr()
_quote_repr.maxstring = _quote_repr.maxother = MAX_QUOTED_CHARS
_quote_repr.maxlist = _quote_repr.maxtuple = _quote_repr.maxdict = 8


def quote(value: Any, limit: int = MAX_QUOTED_CHARS) -> str:
    """`repr(value)` cut to about `limit` characters, without building the full repr of a huge value."""
    text = _quote_repr.repr(value)
    return text if len(text) <= limit else text[:limit] + '...'


def _is_number_type(annotation: Any) -> bool:
    """Does the annotation take ints or floats (alone, in a union, or as the items of a tuple or list)?"""
    if annotation in (int, float):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, tuple, list):
        return any(_is_number_type(arg) for arg in typing.get_args(annotation) if arg is not Ellipsis)
    return False


class _Section(BaseModel):
    model_config = ConfigDict(extra='forbid', validate_assignment=True, allow_inf_nan=False)

    @field_validator('*', mode='before')
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads True as 1 and False as 0; in a config that is always a mistake
        field = cls.model_fields.get(info.field_name)
        if field is None or not _is_number_type(field.annotation):
            return value
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, bool) for v in items):
            raise ValueError('expected a number, not a boolean')
        return value


class ModelConfig(_Section):
    name: str = 'xcit_nano_12_p16_224'
    num_classes: int | None = Field(None, description='default: the number of classes in the training data')
    pretrained: bool = False
    checkpoint: str | None = Field(None, description='weights to start from, any supported format (like --load)')
    drop_path_rate: float | None = Field(None, ge=0, lt=1)
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra arguments for the model's constructor")


class DataConfig(_Section):
    dataset: Literal['imagefolder', 'labellist', 'webdataset', 'digits', 'digit_views', 'digit_places',
                     'digit_scenes', 'coco', 'semantic_folder'] = 'digits'
    root: str | None = Field(None, description=(
        'imagefolder: folder with the split folders; labellist: image root; webdataset: folder with the .tar '
        'shards and their info.json; coco: folder with the split image folders and '
        'annotations/instances_<split>.json; semantic_folder: see semantic_layout'))
    train_split: str = Field('train', description=(
        'imagefolder, coco: sub-folder (coco: e.g. train2017); labellist: label file; webdataset: a split of '
        "info.json or a brace pattern of shards (train-{000000..000009}.tar); semantic_folder: the split's "
        'folder (ade20k: training) or list (voc)'))
    val_split: str = Field('val', description='imagefolder: sub-folder; labellist: label file; webdataset: as train_split')
    shuffle_buffer: int = Field(1000, ge=0, le=1_000_000, description=(
        'webdataset: samples held to shuffle the training stream (shards are shuffled too); 0: the shards and '
        'samples in their written order'))
    image_size: int | None = Field(None, ge=8, le=4096, description=(
        "default: the model's pretrained input size; at most 4096, and one batch of float32 images "
        "(batch_size x 3 x image_size^2 x 4 bytes) must fit in 16 GiB"))
    batch_size: int = Field(64, ge=1, le=65536, description='per process (see image_size for the memory bound)')
    eval_batch_size: int | None = Field(None, ge=1, le=65536)
    num_workers: int = Field(2, ge=0, le=256)
    on_corrupt: Literal['skip', 'error'] = 'skip'
    interpolation: Literal['nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos'] | None = Field(
        None, description="default: the model's (bicubic for XCiT)")
    crop_pct: float | None = Field(None, gt=0, le=1)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = Field(None, description='each above 0')
    digits_size: int = Field(32, ge=8, le=512, description=(
        'digits: side the 8x8 images are upsampled to; all 1,797 are kept in memory, 1.4 GB at 512; '
        'digit_views, digit_places: side of the canvas'))
    views_per_digit: int = Field(1, ge=1, le=1000, description=(
        'digit_views, digit_places: how many different views of each training digit an epoch holds (val: one each)'))
    semantic_layout: Literal['ade20k', 'voc'] = Field('ade20k', description=(
        'semantic_folder: ade20k: <root>/images/<split> with <root>/annotations/<split>; voc: <root>/JPEGImages '
        'with <root>/SegmentationClass, the stems in <root>/ImageSets/Segmentation/<split>.txt; label maps are '
        'PNGs of class indices (255: ignored), model.num_classes says how many'))
    reduce_zero_label: bool = Field(False, description=(
        'semantic_folder: label 0 is ignored and the others drop by one (ADE20K, whose 0 is unlabelled)'))

    @field_validator('std')
    @classmethod
    def _positive_std(cls, value):
        if value is not None and min(value) <= 0:
            raise ValueError('every std must be above 0 (images are divided by it)')
        return value

    @model_validator(mode='after')
    def _batch_fits(self):
        size = self.image_size or 224  # unset: the model's pretrained size, 224 or more
        for key in ('batch_size', 'eval_batch_size'):
            batch = getattr(self, key)
            if batch is not None and batch * 3 * size * size * 4 > MAX_BATCH_BYTES:
                raise ValueError(
                    f'data.{key}={batch} at image_size {size}: one batch of float32 images would take '
                    f'{batch * 3 * size * size * 4 / 2**30:.0f} GiB, more than the {MAX_BATCH_BYTES >> 30} GiB bound; '
                    f'at this size the batch can be at most {MAX_BATCH_BYTES // (12 * size * size)}')
        return self


class AugmentConfig(_Section):
    scale: tuple[float, float] = Field((0.08, 1.0), description='(min, max) area share of the random crop, in (0, 1]')
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description='(min, max) aspect ratio of the random crop')
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
    repeated_aug: int = Field(1, ge=1, le=64, description='repeats of each image per epoch (DeiT/official recipe: 3)')
    short_sides: list[int] = Field(default_factory=list, description=(
        'dense tasks: resize keeping the ratio, the short side drawn from these (and the long side at most max_side)'))
    max_side: int | None = Field(None, ge=8, le=16384)
    crop_size: tuple[int, int] | None = Field(None, description='dense tasks: random (height, width) crop, padded when larger')

    @field_validator('short_sides')
    @classmethod
    def _sides_in_range(cls, value):
        if any(not 8 <= side <= 16384 for side in value):
            raise ValueError('each short side must be in [8, 16384]')
        return value

    @field_validator('crop_size')
    @classmethod
    def _crop_in_range(cls, value):
        if value is not None and not all(8 <= side <= 16384 for side in value):
            raise ValueError('expected (height, width), each in [8, 16384]')
        return value

    @field_validator('scale', 'ratio')
    @classmethod
    def _ordered_range(cls, value, info: ValidationInfo):
        low, high = value
        if not 0 < low <= high or (info.field_name == 'scale' and high > 1):
            bound = '0 < min <= max <= 1' if info.field_name == 'scale' else '0 < min <= max'
            raise ValueError(f'expected (min, max) with {bound}')
        return value


class OptimConfig(_Section):
    lr: float = Field(5e-4, gt=0)
    scale_lr: bool = Field(False, description='lr * global_batch / lr_base_batch (official recipe)')
    lr_base_batch: int = Field(512, ge=1)
    weight_decay: float = Field(0.05, ge=0)
    weight_decay_end: float | None = Field(None, ge=0, description=(
        'weight decay follows a cosine from weight_decay to this over the run (DINO: 0.04 -> 0.4)'))
    betas: tuple[float, float] = Field((0.9, 0.999), description='each in [0, 1)')
    eps: float = Field(1e-8, gt=0)
    no_decay: Literal['official', 'passl', 'layernorm', 'dino'] = Field(
        'official', description='official: 1-D params, biases, cls token; passl: names containing no_decay_names; '
                                'layernorm: LayerNorm weights and biases only (the official dense recipes); '
                                'dino: 1-D params and biases')
    no_decay_names: list[str] = Field(default_factory=lambda: ['temperature', 'pos_embed', 'cls_token', 'dist_token'])
    layer_decay: float | None = Field(None, gt=0, le=1, description='layer-wise lr decay: block i of n gets '
                                      'lr * layer_decay ** (n - i); the stem its lowest, the heads the full lr')
    clip_grad: float | None = Field(None, gt=0, description='max gradient norm')
    clip_mode: Literal['norm', 'per_parameter'] = Field('norm', description=(
        "norm: of all gradients together; per_parameter: each parameter's gradient on its own (DINO)"))
    accum_steps: int = Field(1, ge=1)

    @field_validator('betas')
    @classmethod
    def _betas_below_one(cls, value):
        if not all(0 <= b < 1 for b in value):
            raise ValueError('each beta must be in [0, 1)')
        return value


class ScheduleConfig(_Section):
    """Linear warmup, then one of the decays the published recipes use, stepped per optimizer step."""
    epochs: int = Field(300, ge=1)
    decay: Literal['cosine', 'step', 'poly'] = Field(
        'cosine', description='cosine to min_lr (classification); step: x gamma at each of milestones (Mask '
                              'R-CNN); poly: (1 - progress) ** power down to min_lr (mmseg)')
    milestones: list[float] = Field(default_factory=list, description='step: epochs at which the lr is multiplied by gamma')
    gamma: float = Field(0.1, gt=0, le=1)
    power: float = Field(1.0, gt=0)
    warmup_epochs: float = Field(5, ge=0)
    warmup_steps: int | None = Field(None, ge=0, description='warmup in optimizer steps instead of warmup_epochs')
    warmup_lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(1e-5, ge=0)

    @model_validator(mode='after')
    def _milestones_fit(self):
        if self.decay == 'step' and not self.milestones:
            raise ValueError('decay: step needs milestones (epochs)')
        if self.decay != 'step' and self.milestones:
            raise ValueError(f'milestones are for decay: step, not {self.decay}')
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])) or any(
                not 0 < m <= self.epochs for m in self.milestones):
            raise ValueError(f'milestones {self.milestones} must increase within (0, epochs={self.epochs}]')
        return self


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


class ScenesConfig(_Section):
    """The built-in `digit_scenes` data of the dense tasks (`xcit.data.scenes`)."""
    train_length: int = Field(2048, ge=1, le=10_000_000, description='scenes per training epoch')
    val_length: int = Field(200, ge=1, le=10_000_000)
    min_side: int = Field(128, ge=8, le=4096)
    max_side: int = Field(256, ge=8, le=4096)
    digit_sizes: tuple[int, int] = Field((20, 72), description='(min, max) digit height in pixels')
    max_digits: int = Field(6, ge=1, le=64)

    @model_validator(mode='after')
    def _sizes_fit(self):
        if self.min_side > self.max_side:
            raise ValueError(f'min_side {self.min_side} is above max_side {self.max_side}')
        low, high = self.digit_sizes
        if not 8 <= low <= high <= self.min_side:
            raise ValueError(f'digit_sizes {self.digit_sizes} must lie in [8, min_side={self.min_side}]')
        return self


class LossConfig(_Section):
    class_weight: list[float] | None = Field(None, description=(
        "segmentation: the cross-entropy's weight of each class (mmseg's class_weight); default: all 1"))

    @field_validator('class_weight')
    @classmethod
    def _non_negative(cls, value):
        if value is not None and (not value or min(value) < 0):
            raise ValueError('expected one weight of 0 or more per class')
        return value


class InferenceConfig(_Section):
    """How segmentation evaluates an image: one pass over the whole of it (resized when `short_side` is set,
    ADE20K's recipe: 512, at most 2048), or `crop`-sized windows `stride` apart, averaged."""
    mode: Literal['whole', 'slide'] = 'whole'
    short_side: int | None = Field(None, ge=8, le=8192, description='whole: resize keeping the ratio to this short side')
    max_side: int | None = Field(None, ge=8, le=16384, description='whole: ... and at most this long side')
    crop: int = Field(512, ge=32, le=8192, description='slide: window side')
    stride: int = Field(341, ge=1, le=8192, description='slide: step between windows')

    @model_validator(mode='after')
    def _windows_overlap(self):
        if self.stride > self.crop:
            raise ValueError(f'stride {self.stride} is above crop {self.crop}: pixels between windows would get no label')
        return self


class DistillConfig(_Section):
    type: Literal['none', 'hard', 'soft', 'dml'] = 'none'
    teacher: str = Field('regnety_160', description='a registered model, else a timm model name')
    teacher_weights: str | None = Field(None, description='weights file for the teacher, any supported format')
    teacher_pretrained: bool = False
    teacher_kwargs: dict[str, Any] = Field(default_factory=dict)
    alpha: float = Field(0.5, ge=0, le=1, description='weight of the distillation term (dml: of the KL term)')
    tau: float = Field(1.0, gt=0, description='soft: temperature')


class DinoConfig(_Section):
    """`task: dino`: facebookresearch/dino's main_dino.py arguments, by their names there."""
    out_dim: int = Field(65536, ge=2, le=1_048_576, description='dimension of the DINO head output')
    hidden_dim: int = Field(2048, ge=1, le=65536)
    bottleneck_dim: int = Field(256, ge=1, le=65536)
    head_layers: int = Field(3, ge=1, le=8)
    use_bn_in_head: bool = False
    norm_last_layer: bool = Field(True, description="keep the last layer's weight-norm gains at 1")
    momentum_teacher: float = Field(0.996, ge=0, le=1, description='teacher EMA momentum, cosine to 1 over the run')
    warmup_teacher_temp: float = Field(0.04, gt=0)
    teacher_temp: float = Field(0.04, gt=0, description='reached linearly after warmup_teacher_temp_epochs')
    warmup_teacher_temp_epochs: int = Field(0, ge=0)
    student_temp: float = Field(0.1, gt=0)
    center_momentum: float = Field(0.9, ge=0, lt=1)
    freeze_last_layer: int = Field(1, ge=0, description='epochs during which the last layer gets no update')
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    renders_per_sample: int = Field(1, ge=1, le=64, description=(
        'pretraining crops come from this many independent draws of each sample (crop k from draw k mod n; '
        'digit_places only): 2 gives the two global crops the digit at two places, like two photos of one object'))
    local_crops_number: int = Field(8, ge=0, le=64)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_size: int = Field(96, ge=8, le=4096, description='global crops are data.image_size')
    blur_radius: tuple[float, float] = Field((0.1, 2.0), description='Gaussian blur radius range, in pixels')
    knn_k: int = Field(20, ge=1, le=10_000, description='evaluation: neighbours of the weighted k-NN')
    knn_temperature: float = Field(0.07, gt=0)
    probe_epochs: int = Field(0, ge=0, le=10_000, description=(
        'evaluation: also train a linear probe on the frozen features for this many epochs (0: k-NN only)'))

    @model_validator(mode='after')
    def _scales(self):
        for key in ('global_crops_scale', 'local_crops_scale'):
            low, high = getattr(self, key)
            if not 0 < low <= high <= 1:
                raise ValueError(f'{key} must be (min, max) with 0 < min <= max <= 1, not ({low}, {high})')
        if not 0 <= self.blur_radius[0] <= self.blur_radius[1]:
            raise ValueError(f'blur_radius must be (min, max) with 0 <= min <= max, not {self.blur_radius}')
        return self


class Config(_Section):
    experiment: str | None = Field(None, description='run folder name (default: the config file name)')
    output_dir: str = 'runs'
    task: str = Field('classification', description='what is trained: a task registered in xcit.tasks')
    seed: int = Field(0, ge=0, lt=2**63)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    scenes: ScenesConfig = Field(default_factory=ScenesConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    dino: DinoConfig = Field(default_factory=DinoConfig)

    @field_validator('experiment')
    @classmethod
    def _plain_name(cls, value):
        if value is not None and (not value or '/' in value or value in ('.', '..')):
            raise ValueError('must be a plain folder name')
        return value

    @model_validator(mode='after')
    def _consistent(self):
        mixing = self.augment.mixup > 0 or self.augment.cutmix > 0
        if self.dino.renders_per_sample > 1 and (self.task, self.data.dataset) != ('dino', 'digit_places'):
            raise ValueError('dino.renders_per_sample above 1 needs task dino on the digit_places dataset, the one '
                             'source that can draw a sample again')
        if mixing and self.augment.mixup_mode == 'batch' and self.data.batch_size % 2:
            raise ValueError(f'data.batch_size must be even with mixup/cutmix in batch mode (got {self.data.batch_size})')
        if self.data.dataset not in ('digits', 'digit_views', 'digit_places', 'digit_scenes') and not self.data.root:
            raise ValueError(f'data.root is required for the {self.data.dataset} dataset')
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode='json')


# --- loading -----------------------------------------------------------------------------------------

def check_size(data: Any, source: str) -> None:
    """Refuse values that expand beyond what any config holds (YAML aliases can nest one list inside another
    until a few lines stand for billions of values): counted without expanding, shared parts once per use."""
    stack, count = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f'{source}: more than {MAX_CONFIG_VALUES:,} values (YAML aliases expanding?); '
                              'a config is far smaller')
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f'{source}: values nested more than {MAX_CONFIG_DEPTH} levels deep')
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node)
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, (str, bytes)) and len(node) > MAX_CONFIG_BYTES:
            raise ConfigError(f'{source}: a value of {len(node):,} characters; no config value is that long')


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f'{path}: is a folder, not a config file')
    if not path.is_file():
        raise ConfigError(f'config file not found: {path}')
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f'{path}: {size:,} bytes is not a config file (the limit is {MAX_CONFIG_BYTES:,})')
        text = path.read_bytes().decode('utf-8')
    except UnicodeDecodeError as e:
        raise ConfigError(f'{path}: not UTF-8 text (byte {e.start}); is it a config file?') from None
    except OSError as e:
        raise ConfigError(f'{path}: cannot read the file ({e.strerror or e})') from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f'{path}: not valid YAML ({quote_line(e)})') from None
    except RecursionError:
        raise ConfigError(f'{path}: values nested too deeply for a config file') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: expected a mapping (key: value lines) at the top level, '
                          f'found {type(data).__name__}')
    check_size(data, str(path))
    return data


def _shorten(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + '...'


def quote_line(error: BaseException) -> str:
    """The first line of an error message, at most MAX_QUOTED_CHARS long."""
    lines = str(error).strip().splitlines()
    return _shorten(lines[0] if lines else type(error).__name__)


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
    if len(_seen) >= MAX_CONFIG_DEPTH:
        raise ConfigError(f'{path}: _base_ files nested more than {MAX_CONFIG_DEPTH} deep')
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
    """'a.b.c=value' -> (['a', 'b', 'c'], value); values are Python literals or YAML's null/true/false, anything
    else a string. YAML's spellings matter where no schema coerces the value (`model.kwargs`): there the string
    'false' would be truthy."""
    key, sep, raw = text.partition('=')
    if not sep or not key.strip():
        raise ConfigError(f'override {quote(text)} is not of the form key.path=value')
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f'override {quote(key.strip())}: a value of {len(raw):,} characters; '
                          'no config value is that long')
    raw = raw.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = {'null': None, 'true': True, 'false': False}.get(raw, raw)
    check_size(value, f'override {quote(key.strip())}')
    return key.strip().split('.'), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {quote(text)}: {'.'.join(path[:path.index(part) + 1])} is not a section")
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
    if len(str(loc[-1])) > 100:
        return None
    matches = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.5)
    return '.'.join([*map(str, loc[:-1]), matches[0]]) if matches else None


def _explain(error: ValidationError, source: str, limit: int = 5) -> str:
    """One line naming each wrong key (the first `limit` of them), what is wrong, and the value found."""
    lines = []
    items = error.errors()
    for item in items[:limit]:
        loc = [str(p) for p in item['loc']]
        key = _shorten('.'.join(loc), 120) if loc else '(top level)'
        if item['type'] == 'extra_forbidden':
            hint = _closest_key(loc)
            lines.append(f"unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else ''))
        else:
            got = item.get('input')
            shown = f' (got {quote(got)})' if not isinstance(got, dict) and got is not None else ''
            message = ' '.join(item['msg'].split()).removeprefix('Value error, ')
            lines.append(f"'{key}': {message}{shown}" if loc else message)
    if len(items) > limit:
        lines.append(f'and {len(items) - limit} more')
    return f'{source}: ' + '; '.join(lines)


def validate_config(data: Any, source: str = 'config') -> Config:
    """A `Config` from plain data (a loaded YAML file, a checkpoint's stored config), or a one-line ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f'{source}: expected a mapping of config sections, found {type(data).__name__}')
    check_size(data, source)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, source)) from None


# (recognise, translate) pairs for other projects' config files; translate returns (our data, notes)
_FOREIGN_READERS: list[tuple[Any, Any]] = []


def register_config_reader(recognise, translate) -> None:
    """Read another project's config files as ours: `recognise(data)` says whether a loaded file is one,
    `translate(data, source)` returns (our config as plain data, notes on what was not carried over)."""
    _FOREIGN_READERS.append((recognise, translate))


def read_config_file(path: str | os.PathLike) -> dict:
    """One config file over its `_base_`s, as plain data in our schema: another project's config (PaddlePaddle
    PASSL's) is recognised by its shape and translated, and what it cannot carry over is logged, key by key."""
    data = load_yaml_tree(path)
    for recognise, translate in _FOREIGN_READERS:
        if recognise(data):
            data, notes = translate(data, str(path))
            for note in notes:
                _logger.warning('%s: not carried over: %s', path, note)
            break
    return data


def load_config(paths: str | os.PathLike | Sequence[str | os.PathLike] = (), overrides: Sequence[str] = ()) -> Config:
    """Layer the config files (each over its `_base_`s; PASSL's translated), apply `-o` overrides, validate."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    data: dict = {}
    for path in paths:
        data = merge(data, read_config_file(path))
    data = apply_overrides(data, overrides)
    if paths and 'experiment' not in data:
        data['experiment'] = Path(paths[-1]).stem
    return validate_config(data, ', '.join(str(p) for p in paths) or 'config')


def save_config(config: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
