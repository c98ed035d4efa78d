"""PaddlePaddle PASSL's YAML configs, read as they are and translated into ours.

A PASSL config is recognised by its shape: `model.architecture` (a `SwinWrapper`-style
classifier) or `model.name: DistillationWrapper` with `models: [Teacher, Student]`, a
`dataloader` section with transform lists, `lr_scheduler`, `optimizer` and hooks. The
translation follows the table in docs/configs.md. Every key that is not carried over is
reported once: as an error where the run would mean something else here, as a note where
the difference is cosmetic (a device name, a loader flag).
"""
from __future__ import annotations

import math
from typing import Any

from .config import ConfigError, quote, register_config_reader
from . import models  # noqa: F401  (registers the families whose variants an architecture dict is matched to)
from .registry import IMAGENET_MEAN, IMAGENET_STD, get_model_entry, list_models

# PASSL's architecture keys -> our constructor keyword, per family
_XCIT_KEYS = {'patch_size': 'patch_size', 'embed_dim': 'embed_dim', 'depth': 'depth', 'num_heads': 'num_heads',
              'eta': 'eta', 'tokens_norm': 'tokens_norm', 'img_size': 'img_size', 'drop_path_rate': None}
_CVT_KEYS = {'embed_dim': 'embed_dims', 'depth': 'depths', 'num_heads': 'num_heads', 'img_size': 'img_size',
             'drop_path_rate': None}
_FAMILIES = {'XCiT': ('xcit', _XCIT_KEYS), 'CvT': ('cvt', _CVT_KEYS)}
_HOOKS = {'EvaluateHook'}  # custom_config hooks with an equivalent here (evaluation every epoch)


def is_passl_config(data: Any) -> bool:
    if not isinstance(data, dict) or not isinstance(data.get('model'), dict):
        return False
    model = data['model']
    return ('architecture' in model or model.get('name') == 'DistillationWrapper'
            or ('dataloader' in data and 'lr_scheduler' in data))


class _Translation:
    def __init__(self, source: str):
        self.source = source
        self.notes: list[str] = []
        self.out: dict[str, dict] = {}
        self.val_root: str | None = None  # the evaluation folder's parent, which must be the training one's

    def set(self, path: str, value: Any) -> None:
        *sections, key = path.split('.')
        node = self.out
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value

    def note(self, key: str, why: str) -> None:
        self.notes.append(f'{key}: {why}')

    def error(self, key: str, why: str) -> ConfigError:
        return ConfigError(f'{self.source}: PASSL key {key}: {why}')


def _plain(value: Any) -> Any:
    """A YAML value with PASSL's number strings ('1e-5', which YAML 1.1 leaves a string) read as numbers,
    lists as tuples."""
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _fraction(t: _Translation, key: str, value: Any) -> float:
    """PASSL's `scale: 1.0/255.0`, a string its loader evaluates; read here as a quotient, never evaluated."""
    if isinstance(value, str) and value.count('/') == 1:
        top, bottom = value.split('/')
        return _number(t, key, top.strip()) / _number(t, key, bottom.strip())
    return _number(t, key, value)


def _number(t: _Translation, key: str, value: Any) -> float:
    value = _plain(value) if isinstance(value, str) else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise t.error(key, f'expected a number, found {quote(value)}')
    return value


def _section(t: _Translation, data: dict, key: str, required: bool = True) -> dict:
    value = data.get(key.rsplit('.', 1)[-1])
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise t.error(key, f'expected a section, found {quote(value)}')
    return value


def _model_name(t: _Translation, key: str, architecture: dict, image_size: int = 224) -> None:
    """model.name: the registered variant whose constructor arguments the architecture dict matches,
    else the family's closest variant with the differing values as model.kwargs (and a warning)."""
    if not isinstance(architecture, dict) or architecture.get('name') not in _FAMILIES:
        found = architecture.get('name') if isinstance(architecture, dict) else architecture
        raise t.error(f'{key}.name', f'unknown backbone {quote(found)}; this package reads XCiT and CvT configs')
    family, keys = _FAMILIES[architecture['name']]
    wanted = {}
    for name, value in architecture.items():
        if name == 'name':
            continue
        if name not in keys:
            raise t.error(f'{key}.{name}', f'not an argument of {architecture["name"]} here')
        if keys[name] is None:  # drop_path_rate
            t.set('model.drop_path_rate', _number(t, f'{key}.{name}', value))
            continue
        wanted[keys[name]] = _plain(value)
    candidates = []
    for name in list_models():
        entry = get_model_entry(name)
        if entry.family != family:
            continue
        kwargs = dict(getattr(entry.builder, 'keywords', {}))
        wanted_here = wanted if 'img_size' in wanted else dict(wanted, img_size=image_size)
        differing = {k: v for k, v in wanted_here.items() if kwargs.get(k) != v}
        candidates.append((len(differing), name, differing))
    if not candidates:
        raise t.error(f'{key}.name', f'no {architecture["name"]} model is registered')
    count, name, differing = min(candidates, key=lambda c: c[0])
    t.set('model.name', name)
    if count:
        t.set('model.kwargs', {k: list(v) if isinstance(v, tuple) else v for k, v in differing.items()})
        t.note(key, f'matches no registered {architecture["name"]} variant; built as {name} with '
                    f'{", ".join(f"{k}={v}" for k, v in differing.items())}')


def _head(t: _Translation, key: str, head: Any) -> None:
    if head is None:
        return
    if not isinstance(head, dict):
        raise t.error(key, f'expected a section, found {quote(head)}')
    if 'num_classes' in head:
        t.set('model.num_classes', int(_number(t, f'{key}.num_classes', head['num_classes'])))
    for name in head:
        if name not in ('name', 'num_classes', 'in_channels'):
            raise t.error(f'{key}.{name}', 'not an argument of a classification head here')


def _classifier(t: _Translation, key: str, model: dict, image_size: int) -> None:
    if not isinstance(model, dict):
        raise t.error(key, f'expected a section, found {quote(model)}')
    for name in model:
        if name not in ('name', 'architecture', 'head'):
            raise t.error(f'{key}.{name}', 'not a key of a PASSL classifier wrapper')
    _model_name(t, f'{key}.architecture', model.get('architecture'), image_size)
    _head(t, f'{key}.head', model.get('head'))


def _regnet_teacher(t: _Translation, key: str, teacher: dict) -> str:
    """timm's name for PASSL's `Classification(RegNet(...))` teacher, from its design-space parameters."""
    from .checkpoints.regnet import regnet_stages, timm_regnet_name
    backbone = teacher.get('backbone') if isinstance(teacher, dict) else None
    if not isinstance(backbone, dict) or backbone.get('name') != 'RegNet':
        found = backbone.get('name') if isinstance(backbone, dict) else backbone
        raise t.error(f'{key}.backbone.name', f'unknown teacher backbone {quote(found)}; PASSL distils from RegNet')
    params = {}
    for name in ('w_a', 'w_0', 'w_m', 'd', 'group_w'):
        if name not in backbone:
            raise t.error(f'{key}.backbone.{name}', 'missing: the RegNet cannot be named without it')
        params[name] = _number(t, f'{key}.backbone.{name}', backbone[name])
    unknown = sorted(set(backbone) - {'name', 'w_a', 'w_0', 'w_m', 'd', 'group_w', 'bot_mul', 'q', 'se_on'})
    if unknown:
        raise t.error(f'{key}.backbone.{unknown[0]}', 'not an argument of PASSL\'s RegNet')
    if _number(t, f'{key}.backbone.bot_mul', backbone.get('bot_mul', 1.0)) != 1.0:
        raise t.error(f'{key}.backbone.bot_mul', 'timm\'s RegNets have a bottleneck ratio of 1')
    stages = regnet_stages(params['w_a'], int(params['w_0']), params['w_m'], int(params['d']), int(params['group_w']),
                           q=int(_number(t, f'{key}.backbone.q', backbone.get('q', 8))))
    name = timm_regnet_name(*stages, se=bool(backbone.get('se_on', False)))
    if name is None:
        raise t.error(f'{key}.backbone', f'RegNet with stage widths {stages[0]} and depths {stages[1]} is none of '
                                         "timm's regnetx_* / regnety_*")
    return name


def _distillation(t: _Translation, model: dict, image_size: int) -> None:
    members = model.get('models')
    parts = {}
    if isinstance(members, list):
        for member in members:
            if isinstance(member, dict) and len(member) == 1:
                parts.update(member)
    if set(parts) != {'Teacher', 'Student'}:
        raise t.error('model.models', 'expected a Teacher and a Student entry')
    for name in model:
        if name not in ('name', 'models', 'pretrained_list', 'freeze_params_list', 'infer_model_key',
                        'dml_loss_weight', 'head_loss_weight'):
            raise t.error(f'model.{name}', 'not a key of PASSL\'s DistillationWrapper')
    _classifier(t, 'model.models.Student', parts['Student'], image_size)
    t.set('distill.teacher', _regnet_teacher(t, 'model.models.Teacher', parts['Teacher']))
    order = [next(iter(m)) for m in members]
    pretrained = model.get('pretrained_list') or [None, None]
    frozen = model.get('freeze_params_list') or [True, False]
    for name, weights, freeze in zip(order, pretrained, frozen):
        if name == 'Teacher':
            if weights:
                t.set('distill.teacher_weights', str(weights))
            if not freeze:
                raise t.error('model.freeze_params_list', 'the teacher is trained in this config; '
                                                          'distillation here keeps the teacher frozen')
        elif weights:
            t.set('model.checkpoint', str(weights))
    if model.get('infer_model_key', 'Student') != 'Student':
        raise t.error('model.infer_model_key', 'only the Student is evaluated and saved here')
    dml = _number(t, 'model.dml_loss_weight', model.get('dml_loss_weight', 0.5))
    head = _number(t, 'model.head_loss_weight', model.get('head_loss_weight', 0.5))
    if not math.isclose(dml + head, 1.0):
        raise t.error('model.dml_loss_weight', f'{dml} + head_loss_weight {head} is not 1: the loss here is '
                                               '(1 - alpha) x task + alpha x KL')
    t.set('distill.type', 'dml')
    t.set('distill.alpha', dml)


def _split(t: _Translation, key: str, dataroot: Any) -> tuple[str, str]:
    if not isinstance(dataroot, str) or not dataroot.strip('/'):
        raise t.error(key, f'expected a folder, found {quote(dataroot)}')
    parts = dataroot.rstrip('/').rsplit('/', 1)
    return (parts[0], parts[1]) if len(parts) == 2 else ('.', parts[0])


def _transforms(t: _Translation, key: str, transforms: Any, train: bool) -> None:
    if not isinstance(transforms, list):
        raise t.error(key, f'expected a list of transforms, found {quote(transforms)}')
    names = []
    resize = crop = None
    for i, transform in enumerate(transforms):
        where = f'{key}[{i}]'
        if not isinstance(transform, dict) or 'name' not in transform:
            raise t.error(where, f'expected a transform with a name, found {quote(transform)}')
        name = transform['name']
        names.append(name)
        if name == 'RandomResizedCrop' and train:
            t.set('data.image_size', int(_number(t, f'{where}.size', transform.get('size', 224))))
            for name_ in ('scale', 'ratio'):
                if name_ in transform:
                    t.set(f'augment.{name_}', [float(_number(t, f'{where}.{name_}', v)) for v in transform[name_]])
            if 'interpolation' in transform:
                t.set('data.interpolation', transform['interpolation'])
        elif name == 'RandomHorizontalFlip' and train:
            t.set('augment.hflip', float(_number(t, f'{where}.prob', transform.get('prob', 0.5))))
        elif name == 'AutoAugment' and train:
            t.set('augment.auto_augment', transform.get('config_str'))
        elif name == 'RandomErasing' and train:
            t.set('augment.reprob', float(_number(t, f'{where}.prob', transform.get('prob', 0.5))))
            t.set('augment.remode', transform.get('mode', 'const'))
            t.set('augment.recount', int(_number(t, f'{where}.max_count', transform.get('max_count', 1))))
        elif name in ('Normalize', 'NormalizeImage'):
            # (pixel * scale - mean) / std on 0-255 pixels (Normalize: scale 1) is ours on 0-1 pixels with
            # mean and std divided by 255 * scale
            scale = _fraction(t, f'{where}.scale', transform.get('scale', 1.0)) if name == 'NormalizeImage' else 1.0
            mean = [_number(t, f'{where}.mean', v) / (255 * scale) for v in transform.get('mean', [])]
            std = [_number(t, f'{where}.std', v) / (255 * scale) for v in transform.get('std', [])]
            if len(mean) != 3 or len(std) != 3:
                raise t.error(where, 'expected three means and three stds (0-255 scale)')
            if not (all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(mean, IMAGENET_MEAN))
                    and all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(std, IMAGENET_STD))):
                t.set('data.mean', mean)
                t.set('data.std', std)
        elif name == 'Resize' and not train:
            resize = _number(t, f'{where}.size', transform.get('size'))
            if 'interpolation' in transform:
                t.set('data.interpolation', transform['interpolation'])
        elif name == 'CenterCrop' and not train:
            crop = _number(t, f'{where}.size', transform.get('size'))
        elif name in ('Transpose', 'ToTensor', 'ToCHWImage', 'ToRGB'):
            pass  # the layout change every pipeline here makes
        else:
            raise t.error(where, f'transform {quote(name)} has no equivalent here in the '
                                 f'{"training" if train else "evaluation"} pipeline')
    if train:
        if 'RandomHorizontalFlip' not in names:
            t.set('augment.hflip', 0.0)
        if 'RandomErasing' not in names:
            t.set('augment.reprob', 0.0)
    elif resize is not None:
        if crop is None:
            t.note(key, 'Resize without CenterCrop keeps the aspect ratio; evaluated here as a resize and '
                        'centre crop of the same size (crop_pct 1.0)')
            crop = resize
        t.set('data.crop_pct', min(1.0, crop / resize))


def _batch_transforms(t: _Translation, key: str, batch_transforms: Any) -> None:
    if batch_transforms is None:  # no Mixup: plain cross-entropy, without label smoothing
        t.set('augment.mixup', 0.0)
        t.set('augment.cutmix', 0.0)
        t.set('augment.smoothing', 0.0)
        return
    if not isinstance(batch_transforms, list):
        raise t.error(key, f'expected a list, found {quote(batch_transforms)}')
    for i, transform in enumerate(batch_transforms):
        where = f'{key}[{i}]'
        if not isinstance(transform, dict) or transform.get('name') != 'Mixup':
            found = transform.get('name') if isinstance(transform, dict) else transform
            raise t.error(where, f'batch transform {quote(found)} has no equivalent here (Mixup has)')
        for ours, theirs in (('mixup', 'mixup_alpha'), ('cutmix', 'cutmix_alpha'), ('mixup_prob', 'prob'),
                             ('mixup_switch_prob', 'switch_prob')):
            if theirs in transform:
                t.set(f'augment.{ours}', float(_number(t, f'{where}.{theirs}', transform[theirs])))
        if 'mode' in transform:
            t.set('augment.mixup_mode', transform['mode'])
        t.set('augment.smoothing', float(_number(t, f'{where}.label_smoothing',
                                                 transform.get('label_smoothing', 0.1))))


def _loader(t: _Translation, key: str, part: dict, train: bool) -> None:
    for name in part:
        if name not in ('loader', 'sampler', 'dataset', 'num_workers'):
            raise t.error(f'{key}.{name}', 'not a key of a PASSL data loader')
    loader = _section(t, part, f'{key}.loader', required=False)
    workers = loader.get('num_workers', part.get('num_workers'))
    if workers is not None and train:
        t.set('data.num_workers', int(_number(t, f'{key}.num_workers', workers)))
    if 'use_shared_memory' in loader:
        t.note(f'{key}.loader.use_shared_memory', 'Paddle\'s loader option; PyTorch workers share memory anyway')
    sampler = _section(t, part, f'{key}.sampler')
    batch = sampler.get('batch_size')
    if batch is not None:
        t.set('data.batch_size' if train else 'data.eval_batch_size', int(_number(t, f'{key}.sampler.batch_size',
                                                                                   batch)))
    if sampler.get('shuffle', train) != train or sampler.get('drop_last', train) != train:
        t.note(f'{key}.sampler', 'shuffle and drop_last are fixed here: on for training, off for evaluation')
    dataset = _section(t, part, f'{key}.dataset')
    if dataset.get('name') != 'ImageNet':
        raise t.error(f'{key}.dataset.name', f'dataset {quote(dataset.get("name"))} has no equivalent here '
                                             '(ImageNet: a folder per class)')
    root, split = _split(t, f'{key}.dataset.dataroot', dataset.get('dataroot'))
    t.set('data.dataset', 'imagefolder')
    if train:
        t.set('data.root', root)
        t.set('data.train_split', split)
    else:
        t.set('data.val_split', split)
        t.val_root = root
    _transforms(t, f'{key}.dataset.transforms', dataset.get('transforms', []), train)
    if train:
        _batch_transforms(t, f'{key}.dataset.batch_transforms', dataset.get('batch_transforms'))
    unknown = sorted(set(dataset) - {'name', 'dataroot', 'return_label', 'transforms', 'batch_transforms'})
    if unknown:
        raise t.error(f'{key}.dataset.{unknown[0]}', 'not a key of PASSL\'s ImageNet dataset')


def _warmup_then_cosine(t: _Translation, scheduler: dict, lr: float, warmup_epochs: float, min_lr: float) -> None:
    """Our schedule: linear warmup from PASSL's start_lr, which must end (end_lr) where the cosine starts."""
    t.set('optim.lr', lr)
    t.set('optim.scale_lr', False)
    t.set('schedule.warmup_epochs', warmup_epochs)
    t.set('schedule.warmup_lr', _number(t, 'lr_scheduler.start_lr', scheduler.get('start_lr', 0.0)))
    t.set('schedule.min_lr', min_lr)
    end = _number(t, 'lr_scheduler.end_lr', scheduler.get('end_lr', lr))
    if not math.isclose(end, lr):
        raise t.error('lr_scheduler.end_lr', f'{end} differs from the starting lr {lr}: warmup here ends where the '
                                             'cosine starts')


def _cosine_warmup(t: _Translation, scheduler: dict, epochs: Any) -> None:
    """PASSL's CosineWarmup counts in optimizer steps: its T_max is the run's steps, so the warmup's share of
    them is its share of the epochs."""
    lr = _number(t, 'lr_scheduler.learning_rate', scheduler.get('learning_rate'))
    t_max = _number(t, 'lr_scheduler.T_max', scheduler.get('T_max'))
    warmup = _number(t, 'lr_scheduler.warmup_steps', scheduler.get('warmup_steps', 0))
    if epochs is None or t_max <= 0:
        raise t.error('lr_scheduler.T_max', 'CosineWarmup counts steps: epochs and a positive T_max are needed '
                                            'to express its warmup in epochs')
    _warmup_then_cosine(t, scheduler, lr, warmup_epochs=round(epochs * warmup / t_max, 4),
                        min_lr=_number(t, 'lr_scheduler.eta_min', scheduler.get('eta_min', 0.0)))
    t.note('lr_scheduler.T_max', f'CosineWarmup counts {t_max:g} steps over {epochs} epochs; its '
                                 f'{warmup:g} warmup steps are {epochs * warmup / t_max:.4g} epochs here')
    for name in set(scheduler) - {'name', 'learning_rate', 'T_max', 'warmup_steps', 'start_lr', 'end_lr', 'eta_min'}:
        raise t.error(f'lr_scheduler.{name}', 'not a key of CosineWarmup')


def _schedule(t: _Translation, scheduler: dict, epochs: Any) -> None:
    if scheduler.get('name') == 'CosineWarmup':
        return _cosine_warmup(t, scheduler, epochs)
    if scheduler.get('name') != 'LinearWarmup' or not isinstance(scheduler.get('learning_rate'), dict):
        raise t.error('lr_scheduler.name', f'{quote(scheduler.get("name"))}: only LinearWarmup over '
                                           'CosineAnnealingDecay and CosineWarmup (PASSL\'s XCiT and CvT recipes) '
                                           'are translated')
    cosine = scheduler['learning_rate']
    if cosine.get('name') != 'CosineAnnealingDecay':
        raise t.error('lr_scheduler.learning_rate.name', f'{quote(cosine.get("name"))}: only CosineAnnealingDecay '
                                                         'is translated')
    lr = _number(t, 'lr_scheduler.learning_rate.learning_rate', cosine.get('learning_rate'))
    _warmup_then_cosine(t, scheduler, lr,
                        warmup_epochs=_number(t, 'lr_scheduler.warmup_steps', scheduler.get('warmup_steps', 0)),
                        min_lr=_number(t, 'lr_scheduler.learning_rate.eta_min', cosine.get('eta_min', 0.0)))
    t_max = cosine.get('T_max')
    if t_max is not None and epochs is not None and _number(t, 'lr_scheduler.learning_rate.T_max', t_max) != epochs:
        raise t.error('lr_scheduler.learning_rate.T_max', f'{t_max} is not the {epochs} epochs: the cosine here '
                                                          'spans the run')
    for name in set(scheduler) - {'name', 'learning_rate', 'warmup_steps', 'start_lr', 'end_lr'}:
        raise t.error(f'lr_scheduler.{name}', 'not a key of LinearWarmup')
    for name in set(cosine) - {'name', 'learning_rate', 'T_max', 'eta_min'}:
        raise t.error(f'lr_scheduler.learning_rate.{name}', 'not a key of CosineAnnealingDecay')


def _optimizer(t: _Translation, optimizer: dict) -> None:
    if optimizer.get('name') != 'AdamW':
        raise t.error('optimizer.name', f'{quote(optimizer.get("name"))}: training here uses AdamW')
    t.set('optim.betas', [_number(t, 'optimizer.beta1', optimizer.get('beta1', 0.9)),
                          _number(t, 'optimizer.beta2', optimizer.get('beta2', 0.999))])
    t.set('optim.weight_decay', _number(t, 'optimizer.weight_decay', optimizer.get('weight_decay', 0.01)))
    if 'epsilon' in optimizer:
        t.set('optim.eps', _number(t, 'optimizer.epsilon', optimizer['epsilon']))
    if 'grad_clip' in optimizer:
        clip = optimizer['grad_clip']
        if isinstance(clip, dict) and clip.get('name', 'global_norm') != 'global_norm':
            raise t.error('optimizer.grad_clip.name', f'{quote(clip.get("name"))}: gradients are clipped here by '
                                                      'their global norm')
        norm = clip.get('value', clip.get('clip_norm')) if isinstance(clip, dict) else clip
        t.set('optim.clip_grad', _number(t, 'optimizer.grad_clip', norm))
    names = optimizer.get('exclude_from_weight_decay', [])  # without the list, PASSL decays every parameter
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise t.error('optimizer.exclude_from_weight_decay', 'expected a list of names')
    t.set('optim.no_decay', 'passl')
    t.set('optim.no_decay_names', names)
    for name in set(optimizer) - {'name', 'beta1', 'beta2', 'weight_decay', 'epsilon', 'grad_clip',
                                  'exclude_from_weight_decay'}:
        raise t.error(f'optimizer.{name}', 'not an AdamW argument translated here')


def _hooks(t: _Translation, data: dict) -> None:
    log = data.get('log_config')
    if log is not None:
        if not isinstance(log, dict) or log.get('name') != 'LogHook':
            raise t.error('log_config.name', 'expected LogHook')
        if 'interval' in log:
            t.set('train.log_interval', int(_number(t, 'log_config.interval', log['interval'])))
    checkpoint = data.get('checkpoint')
    if checkpoint is not None:
        if not isinstance(checkpoint, dict) or checkpoint.get('name') != 'CheckpointHook':
            raise t.error('checkpoint.name', 'expected CheckpointHook')
        if 'max_keep_ckpts' in checkpoint:
            t.set('train.keep_last', int(_number(t, 'checkpoint.max_keep_ckpts', checkpoint['max_keep_ckpts'])))
        if checkpoint.get('interval', 1) != 1 or not checkpoint.get('by_epoch', True):
            t.note('checkpoint.interval', 'a checkpoint is written after every epoch here '
                                          '(train.checkpoint_interval adds one every N steps)')
    for i, hook in enumerate(data.get('custom_config') or []):
        name = hook.get('name') if isinstance(hook, dict) else hook
        if name not in _HOOKS:
            raise t.error(f'custom_config[{i}].name', f'hook {quote(name)} has no equivalent here')


_TOP_LEVEL = {'epochs', 'output_dir', 'seed', 'device', 'model', 'dataloader', 'lr_scheduler', 'optimizer',
              'log_config', 'checkpoint', 'custom_config', 'use_amp', 'AMP', 'amp', 'use_simclr_iters',
              'total_iters'}


def _train_crop_size(data: dict) -> int:
    """The training crop's size, which sets the model's image size where the architecture does not."""
    try:
        transforms = data['dataloader']['train']['dataset']['transforms']
        size = next(tr.get('size', 224) for tr in transforms if tr.get('name') == 'RandomResizedCrop')
        return int(_plain(size))
    except (KeyError, TypeError, AttributeError, StopIteration, ValueError):
        return 224


def translate_passl_config(data: dict, source: str = 'PASSL config') -> tuple[dict, list[str]]:
    """(our config as plain data, notes on what was not carried over); a ConfigError names the first key whose
    meaning has no equivalent here."""
    t = _Translation(source)
    for key in data:
        if key not in _TOP_LEVEL:
            raise t.error(str(key), 'not a PASSL training key this package translates')
    epochs = data.get('epochs')
    if epochs is not None:
        t.set('schedule.epochs', int(_number(t, 'epochs', epochs)))
    for key in ('output_dir', 'seed'):
        if key in data:
            t.set(key, data[key])
    if 'device' in data:
        t.note('device', 'the device is chosen at run time here (train.device: auto takes the GPU when there is one)')
    model = data['model']
    image_size = _train_crop_size(data)
    if model.get('name') == 'DistillationWrapper':
        _distillation(t, model, image_size)
    else:
        _classifier(t, 'model', model, image_size)
    dataloader = _section(t, data, 'dataloader')
    for part in dataloader:
        if part not in ('train', 'val'):
            raise t.error(f'dataloader.{part}', 'only train and val loaders are translated')
    _loader(t, 'dataloader.train', _section(t, dataloader, 'dataloader.train'), train=True)
    if 'val' not in dataloader:
        t.note('dataloader', 'no val loader: the run evaluates on data.val_split (default val) with the '
                             "model's evaluation crop")
    else:
        _loader(t, 'dataloader.val', _section(t, dataloader, 'dataloader.val'), train=False)
        if t.val_root != t.out['data']['root']:
            raise t.error('dataloader.val.dataset.dataroot', 'training and evaluation folders must share a parent '
                                                             f'({t.out["data"]["root"]} here)')
    if 'lr_scheduler' in data:
        _schedule(t, _section(t, data, 'lr_scheduler'), epochs)
    if 'optimizer' in data:
        _optimizer(t, _section(t, data, 'optimizer'))
    _hooks(t, data)
    if data.get('use_amp') or data.get('AMP') or data.get('amp'):
        t.set('train.amp', 'fp16')
    order = ('output_dir', 'seed', 'model', 'data', 'augment', 'optim', 'schedule', 'train', 'distill')
    return {k: t.out[k] for k in order if k in t.out}, t.notes


register_config_reader(is_passl_config, translate_passl_config)
