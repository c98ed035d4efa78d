"""The Hugging Face Hub in both directions, in timm's repo layout: `config.json`, the weights, a model card.

A model is named `hf-hub:ORG/REPO[@REVISION]` (a Hub repo) or `local-dir:DIR` (a folder of the
same files), as in timm. `config.json` names the architecture and carries its pretrained cfg, class
count and label names; the weights are `model.safetensors` or `pytorch_model.bin`, read through the
same untrusting reader as every other checkpoint. XCiT weights are written in timm's key layout, so
timm loads the folders written here; CvT and FCViT, which timm does not implement, keep ours.

huggingface_hub is imported only when the Hub is used (`pip install "xcit[hub]"`); its download
honours `HF_HUB_OFFLINE`, `HF_HUB_CACHE` and `HF_HOME`.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch.nn as nn

from ..registry import get_checkpoint_adapter, get_model_entry
from .convert import save_state_dict
from .errors import CheckpointError
from .hub import PretrainedUnavailableError
from .io import atomic_write

HUB_PREFIX = 'hf-hub:'
LOCAL_PREFIX = 'local-dir:'
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
MODEL_CARD_FILE = 'README.md'
# the weight files of a timm-style repo, in the order timm prefers them
WEIGHT_FILES = (WEIGHTS_FILE, 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
INSTALL_HINT = 'pip install "xcit[hub]"'
# pretrained-cfg entries about the published file (where it was fetched from, the accuracy its release
# table states): a saved copy is neither there nor known to score that (and timm's cfg has no accuracy field)
SOURCE_KEYS = frozenset({'url', 'file', 'hf_hub_id', 'hf_hub_filename', 'source', 'file_name', 'download_page',
                         'checkpoint_format', 'top1', 'top1_source'})
# pretrained-cfg entries that JSON stores as lists and the models' cfgs keep as tuples
_TUPLE_KEYS = ('input_size', 'test_input_size', 'min_input_size', 'mean', 'std', 'pool_size')

# how the papers spell the families, for the model card
_FAMILY_NAMES = {'xcit': 'XCiT', 'cvt': 'CvT', 'fcvit': 'FCViT'}


def split_source(name: str) -> tuple[str | None, str]:
    """('hf-hub', 'ORG/REPO[@REV]'), ('local-dir', 'DIR'), or (None, name) for a registered name."""
    for prefix in (HUB_PREFIX, LOCAL_PREFIX):
        if name.startswith(prefix):
            location = name[len(prefix):]
            if not location:
                raise ValueError(f'{name!r}: name a repo after hf-hub: (ORG/REPO) or a folder after local-dir:')
            return prefix[:-1], location
    return None, name


def hub_available() -> bool:
    return find_spec('huggingface_hub') is not None


def import_hub():
    """The huggingface_hub module, or a one-line error saying how to install it."""
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError(f'the Hugging Face Hub needs the huggingface_hub package: {INSTALL_HINT}') from None
    return huggingface_hub


def hub_download(repo: str, filename: str, cache_only: bool = False) -> Path | None:
    """`filename` of the Hub repo `ORG/REPO[@REVISION]`, from the Hub cache or downloaded into it.

    None when the Hub says the repo has no such file; a `PretrainedUnavailableError` naming the
    repo and what to do when neither the Hub nor the cache can supply it. `cache_only` asks the
    cache alone (no network, as with HF_HUB_OFFLINE).
    """
    hf = import_hub()
    from huggingface_hub import constants, errors
    repo_id, _, revision = repo.partition('@')
    name = f'{HUB_PREFIX}{repo}'
    try:
        return Path(hf.hf_hub_download(repo_id, filename, revision=revision or None, library_name='xcit',
                                       local_files_only=cache_only))
    except errors.LocalEntryNotFoundError:
        offline = constants.HF_HUB_OFFLINE
        why = 'HF_HUB_OFFLINE is set' if offline else 'the Hub cannot be reached'
        raise PretrainedUnavailableError(
            f'{name}: cannot fetch {filename}: {why} and it is not in the Hub cache ({constants.HF_HUB_CACHE}). '
            f'Run once with network access{" and without HF_HUB_OFFLINE" if offline else ""} to cache it, or '
            f'download the repo on another machine (hf download {repo_id} --local-dir DIR) and load it with '
            f"create_model('local-dir:DIR', pretrained=True)") from None
    except errors.EntryNotFoundError:
        return None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f'{name}: the repo has no revision {revision!r}') from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f'{name}: no such repo on the Hugging Face Hub, or it is private or gated '
                              '(log in with `hf auth login` if you have access)') from None
    except errors.HFValidationError:
        raise ValueError(f'{name}: not a Hub repo id; expected hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION'
                         ) from None
    except OSError as e:  # HTTP errors other than the above, and connections that fail mid-download
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainedUnavailableError(f'{name}: cannot fetch {filename} from the Hugging Face Hub ({first[:200]})'
                                         ) from None


def hub_weights(repo: str, preferred: str | None = None) -> Path:
    """The weights of a Hub repo: `preferred`, else the first of `WEIGHT_FILES` it holds."""
    names = ([preferred] if preferred else []) + [n for n in WEIGHT_FILES if n != preferred]
    unavailable = None
    for filename in names:
        try:
            # once the Hub has failed, the cache alone: asking again would only wait for the same failure
            path = hub_download(repo, filename, cache_only=unavailable is not None)
        except PretrainedUnavailableError as e:  # another file may still be in the cache
            unavailable = unavailable or e
            continue
        if path is not None:
            return path
    if unavailable is not None:
        raise unavailable
    raise CheckpointError(f"{HUB_PREFIX}{repo}: the repo holds no weights ({', '.join(names)})")


def folder_weights(folder: str | os.PathLike) -> Path:
    """The weights of a local-dir: folder, the first of `WEIGHT_FILES` in it."""
    folder = Path(folder)
    for filename in WEIGHT_FILES:
        if (folder / filename).is_file():
            return folder / filename
    raise CheckpointError(f"{LOCAL_PREFIX}{folder}: the folder holds no weights ({', '.join(WEIGHT_FILES)})")


@dataclass
class HubModelConfig:
    """What a timm-style `config.json` says about the model its weights belong to."""
    architecture: str
    pretrained_cfg: dict
    model_args: dict = field(default_factory=dict)


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value) else value


def parse_hub_config(raw: Any, source: str) -> HubModelConfig:
    """Read timm's `config.json` layout (also its older one, a single flat pretrained cfg)."""
    if not isinstance(raw, dict) or not isinstance(raw.get('architecture'), str) or not raw['architecture']:
        raise CheckpointError(f'{source}: {CONFIG_FILE} names no "architecture": not a timm-style model config')
    if 'pretrained_cfg' in raw:
        cfg = raw['pretrained_cfg']
        if not isinstance(cfg, dict):
            raise CheckpointError(f'{source}: "pretrained_cfg" in {CONFIG_FILE} is not a mapping')
        cfg = dict(cfg)
    else:
        cfg = {k: v for k, v in raw.items() if k not in ('architecture', 'num_features', 'model_args')}
        if 'labels' in cfg:
            cfg['label_names'] = cfg.pop('labels')
    for key in ('num_classes', 'label_names', 'label_descriptions'):
        if key in raw:
            cfg[key] = raw[key]
    if not isinstance(cfg.get('num_classes', 0), int) or cfg.get('num_classes', 0) < 0:
        raise CheckpointError(f'{source}: "num_classes" in {CONFIG_FILE} is not a class count')
    model_args = raw.get('model_args') or {}
    if not isinstance(model_args, dict):
        raise CheckpointError(f'{source}: "model_args" in {CONFIG_FILE} is not a mapping')
    cfg = {k: _tuples(v) if k in _TUPLE_KEYS else v for k, v in cfg.items()}
    return HubModelConfig(raw['architecture'], cfg, {k: _tuples(v) for k, v in model_args.items()})


def read_hub_config(name: str) -> HubModelConfig:
    """The `config.json` of `hf-hub:ORG/REPO[@REV]` or `local-dir:DIR`."""
    source, location = split_source(name)
    if source == 'hf-hub':
        path = hub_download(location, CONFIG_FILE)
        if path is None:
            raise CheckpointError(f'{name}: the repo has no {CONFIG_FILE}; it is not a timm-style model repo')
    elif source == 'local-dir':
        path = Path(location) / CONFIG_FILE
        if not Path(location).is_dir():
            raise CheckpointError(f'{name}: no such folder')
        if not path.is_file():
            raise CheckpointError(f'{name}: the folder has no {CONFIG_FILE} (save_pretrained and timm write one)')
    else:
        raise ValueError(f'{name!r} names neither a Hub repo ({HUB_PREFIX}ORG/REPO) nor a folder ({LOCAL_PREFIX}DIR)')
    try:
        raw = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f'{name}: cannot read {CONFIG_FILE} ({" ".join(str(e).split())[:200]})') from None
    config = parse_hub_config(raw, name)
    config.pretrained_cfg.update(
        dict(hf_hub_id=location, source='hf-hub') if source == 'hf-hub' else dict(file=location, source='local-dir'))
    return config


def source_weights(name: str, pretrained_cfg: Mapping[str, Any]) -> Path:
    """The weight file behind `hf-hub:`/`local-dir:` `name`."""
    source, location = split_source(name)
    if source == 'hf-hub':
        return hub_weights(location, pretrained_cfg.get('hf_hub_filename'))
    return folder_weights(location)


# --- writing --------------------------------------------------------------------------------------

def hub_config(model: nn.Module, label_names: Sequence[str] | None = None,
               label_descriptions: Mapping[str, str] | None = None, model_args: Mapping[str, Any] | None = None
               ) -> dict:
    """The `config.json` of `model` in timm's layout; label names carry over from its cfg while its
    class count is the one they were given for."""
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    architecture = cfg.pop('architecture', None)
    if not architecture:
        raise ValueError('the model has no pretrained_cfg naming its architecture; build it with xcit.create_model')
    num_classes = int(getattr(model, 'num_classes', cfg.get('num_classes', 0)))
    labels = {key: cfg.pop(key, None) for key in ('label_names', 'label_descriptions')}
    if num_classes != cfg.get('num_classes'):  # a new classifier: the cfg's labels were another head's
        labels = {}
    label_names = list(label_names) if label_names is not None else labels.get('label_names')
    label_descriptions = label_descriptions if label_descriptions is not None else labels.get('label_descriptions')
    if isinstance(label_names, list) and len(label_names) != num_classes:
        raise ValueError(f'{len(label_names)} label names for a model with {num_classes} classes')
    cfg = {k: v for k, v in cfg.items() if k not in SOURCE_KEYS}
    cfg['num_classes'] = num_classes
    config: dict[str, Any] = dict(architecture=architecture, num_classes=num_classes)
    if getattr(model, 'num_features', None) is not None:
        config['num_features'] = int(model.num_features)
    if isinstance(getattr(model, 'global_pool', None), str) and model.global_pool:
        config['global_pool'] = model.global_pool
    if label_names:
        config['label_names'] = label_names
    if label_descriptions:
        config['label_descriptions'] = dict(label_descriptions)
    if model_args:
        config['model_args'] = dict(model_args)
    config['pretrained_cfg'] = cfg
    try:
        json.dumps(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f'the model config cannot be written as JSON ({e}); pass plain model_args') from None
    return config


def model_card(model: nn.Module, config: Mapping[str, Any], repo_id: str | None = None, folder: str | None = None,
               train_config: Any = None, metrics: Mapping[str, float] | None = None) -> str:
    """The repo's README.md: metadata for the Hub, the architecture, its preprocessing, how to load it,
    and the training config and measured metrics when given."""
    import yaml
    architecture = config['architecture']
    family = get_model_entry(architecture).family
    adapter = get_checkpoint_adapter(model)
    timm_layout = adapter is not None and adapter.timm_fn is not None
    cfg = config['pretrained_cfg']
    meta = dict(tags=['image-classification', family], library_name='timm' if timm_layout else None,
                license=cfg.get('license'))
    lines = ['---', yaml.safe_dump({k: v for k, v in meta.items() if v}, sort_keys=False).strip(), '---', '',
             f'# {repo_id or architecture}', '']
    params = sum(p.numel() for p in model.parameters())
    classes = f"{config['num_classes']} classes" if config['num_classes'] else 'no classifier (a backbone)'
    lines += [f'{_FAMILY_NAMES.get(family, family)} image classifier `{architecture}`: {classes}, '
              f'{params / 1e6:.2f} M parameters.', '']
    facts = [('architecture', f'`{architecture}`'), ('parameters', f'{params:,}')]
    if cfg.get('input_size'):
        facts.append(('input size', ' x '.join(str(s) for s in cfg['input_size'])))
    for key in ('crop_pct', 'crop_mode', 'interpolation', 'mean', 'std'):
        if cfg.get(key) is not None:
            value = cfg[key]
            facts.append((key.replace('_', ' '), ', '.join(map(str, value)) if isinstance(value, (list, tuple))
                          else str(value)))
    if cfg.get('paper_ids'):
        facts.append(('paper', cfg['paper_ids']))
    if cfg.get('origin_url'):
        facts.append(('code', cfg['origin_url']))
    lines += ['| | |', '|---|---|'] + [f'| {k} | {v} |' for k, v in facts] + ['']
    name = f'{HUB_PREFIX}{repo_id}' if repo_id else f'{LOCAL_PREFIX}{folder or "DIR"}'
    lines += ['## Use', '', '```python', 'import xcit', '',
              f"model = xcit.create_model('{name}', pretrained=True).eval()"]
    if timm_layout:
        lines += ['', '# timm reads the same files', 'import timm', '',
                  f"model = timm.create_model('{name}', pretrained=True).eval()"]
    lines += ['```', '']
    if train_config is not None:
        settings = train_config.to_dict() if hasattr(train_config, 'to_dict') else dict(train_config)
        lines += ['## Training configuration', '', '```yaml', yaml.safe_dump(settings, sort_keys=False).strip(),
                  '```', '']
    if metrics:
        lines += ['## Metrics', '', '| metric | value |', '|---|---|']
        lines += [f'| {k} | {v:.4g} |' if isinstance(v, float) else f'| {k} | {v} |' for k, v in metrics.items()]
        lines += ['']
    return '\n'.join(lines)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, label_names: Sequence[str] | None = None,
                    label_descriptions: Mapping[str, str] | None = None, model_args: Mapping[str, Any] | None = None,
                    config: Any = None, metrics: Mapping[str, float] | None = None, repo_id: str | None = None
                    ) -> Path:
    """Write `model` as a timm-style Hub folder, what timm's `save_for_hf` writes plus a model card.

    `config.json` (architecture, class count, features, label names, pretrained cfg, and
    `model_args` when the model was built with non-default arguments that rebuild it),
    `model.safetensors` (timm's key layout for XCiT, ours for the families timm does not implement)
    and `README.md` (with the training `config`, a `Config` or a mapping, and measured `metrics`
    when given). `xcit.create_model('local-dir:DIR', pretrained=True)` and, for XCiT,
    `timm.create_model('local-dir:DIR', pretrained=True)` load the folder. Returns the folder.
    """
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f'{folder}: is a file; give the folder to write')
    hub_cfg = hub_config(model, label_names, label_descriptions, model_args)
    adapter = get_checkpoint_adapter(model)
    timm_fn = adapter.timm_fn if adapter is not None else None
    save_state_dict(model.state_dict(), folder / WEIGHTS_FILE, 'timm' if timm_fn else 'safetensors',
                    model_name=hub_cfg['architecture'], timm_fn=timm_fn, metadata=dict(format='pt'))
    with atomic_write(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(hub_cfg, indent=2) + '\n', encoding='utf-8')
    card = model_card(model, hub_cfg, repo_id=repo_id, folder=str(folder), train_config=config, metrics=metrics)
    with atomic_write(folder / MODEL_CARD_FILE) as tmp:
        tmp.write_text(card, encoding='utf-8')
    return folder


def push_to_hub(model: nn.Module, repo_id: str, *, commit_message: str = 'Add model', private: bool | None = None,
                token: str | None = None, revision: str | None = None, create_pr: bool = False, **save_kwargs: Any):
    """`save_pretrained` into a temporary folder, uploaded to the Hub repo `repo_id` (created if absent).

    `save_kwargs` go to `save_pretrained`. Returns huggingface_hub's commit info.
    """
    hf = import_hub()
    api = hf.HfApi(token=token)
    repo_id = getattr(api.create_repo(repo_id, private=private, exist_ok=True), 'repo_id', None) or repo_id
    with tempfile.TemporaryDirectory(prefix='xcit-hub-') as folder:
        save_pretrained(model, folder, repo_id=repo_id, **save_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision, create_pr=create_pr)
