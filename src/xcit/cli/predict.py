"""`xcit predict --model NAME --checkpoint W IMAGE_OR_FOLDER...`: top-k classes for each image; for a
detector or segmenter, a PNG per image in --output (boxes, labels, scores and masks drawn over it, or the
colour-coded segmentation beside it) and one line on what was found.

`--model hf-hub:ORG/REPO` (or `local-dir:DIR`) takes the weights and class names of a timm-style
Hugging Face Hub repo (or folder) and needs no --checkpoint.

A folder stands for the image files in it, in name order. An input that cannot
be read is reported on its own line and the others are still classified; the
exit status is then 2.
"""
from __future__ import annotations

import argparse

import torch

MAX_IMAGE_SIZE = 4096


def add_parser(sub) -> None:
    p = sub.add_parser('predict', help='classify images', description=__doc__)
    p.add_argument('images', nargs='+', metavar='IMAGE', help='image files, or folders of them')
    p.add_argument('--model', required=True,
                   help='architecture, e.g. xcit_nano_12_p16_224, or a timm-style Hub repo or folder with its weights '
                        '(hf-hub:ORG/REPO, local-dir:DIR)')
    p.add_argument('--checkpoint', help='weights (any supported format, or a training checkpoint); '
                                        'required unless --model is hf-hub:... or local-dir:...')
    p.add_argument('--topk', type=int, default=5)
    p.add_argument('--image-size', type=int,
                   help=f"input size, 8 to {MAX_IMAGE_SIZE} (default: the run's, else the model's)")
    p.add_argument('--output', default='predictions', help='dense models: the folder for the pictures')
    p.add_argument('--score-threshold', type=float, default=0.5, help='detectors: the least score drawn')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints.hf_hub import split_source
    from ..config import Config
    from ..data import build_eval_transform
    from ..data.datasets import image_files, read_image
    from ._weights import class_names, error, model_with_weights, report_problems, run_config

    if args.checkpoint is None and split_source(args.model)[0] is None:
        raise ValueError(f'--checkpoint is required for {args.model}: only hf-hub: and local-dir: models bring weights')
    if args.topk < 1:
        raise ValueError(f'--topk must be at least 1, not {args.topk}')
    if args.image_size is not None and not 8 <= args.image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f'--image-size must be between 8 and {MAX_IMAGE_SIZE}, not {args.image_size}')
    inputs = image_files(args.images)
    failed = report_problems(args.command, inputs)
    if failed == len(inputs):
        return 2
    model, raw = model_with_weights(args.model, args.checkpoint)
    if model.pretrained_cfg.get('task') in ('detection', 'segmentation'):
        failed += predict_dense(args, model, class_names(raw), inputs)
        return 2 if failed else 0
    # a training checkpoint carries the run's config (input size, normalisation) and class names
    config = run_config(raw, args.checkpoint) or Config()
    if args.image_size is not None:
        config.data.image_size = args.image_size
    classes = class_names(raw) or hub_labels(model)
    transform = build_eval_transform(config, model.pretrained_cfg)
    for path, problem in inputs:
        if problem is not None:
            continue
        try:
            x = transform(read_image(path))[None]
        except ValueError as e:
            error(args.command, e)
            failed += 1
            continue
        with torch.no_grad():
            probs = model(x).softmax(dim=1)[0]
        top = probs.topk(min(args.topk, probs.numel()))
        labels = [classes[i] if classes and i < len(classes) else str(i) for i in top.indices.tolist()]
        print(path + ': ' + ', '.join(f'{label} {p:.3f}' for label, p in zip(labels, top.values.tolist())),
              flush=True)
    return 2 if failed else 0


def hub_labels(model) -> list[str] | None:
    """The class names a Hub repo's config.json gave the model, when they are a list of strings."""
    names = model.pretrained_cfg.get('label_names')
    return list(names) if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names) else None


def predict_dense(args: argparse.Namespace, model, classes: list[str] | None, inputs) -> int:
    """Draw each readable input's detections or segmentation into `args.output`; how many inputs failed."""
    from pathlib import Path

    from torchvision.io import write_png
    from torchvision.transforms.v2.functional import pil_to_tensor

    from ..data.datasets import read_image
    from ..data.dense import pad_and_stack
    from ..viz import draw_detections, draw_segmentation
    from ._weights import error

    if not 0 <= args.score_threshold <= 1:
        raise ValueError(f'--score-threshold must be between 0 and 1, not {args.score_threshold}')
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, failed, written = model.pretrained_cfg, 0, set()
    name = lambda c: classes[c] if classes and c < len(classes) else str(c)  # noqa: E731
    for path, problem in inputs:
        if problem is not None:
            continue
        try:
            image = pil_to_tensor(read_image(path)).float() / 255  # (3, H, W)
            if max(image.shape[-2:]) > MAX_IMAGE_SIZE:
                raise ValueError(f'{path}: {image.shape[-1]}x{image.shape[-2]} pixels, more than {MAX_IMAGE_SIZE} a side')
        except ValueError as e:
            error(args.command, e)
            failed += 1
            continue
        with torch.no_grad():
            if cfg['task'] == 'detection':
                found = model([image])[0]
                picture = draw_detections(image, found, classes, args.score_threshold)
                keep = found['scores'] >= args.score_threshold
                summary = f'{int(keep.sum())} objects' + ''.join(
                    f', {name(c)} {s:.2f}' for c, s in zip(found['labels'][keep].tolist(), found['scores'][keep].tolist()))
            else:
                H, W = image.shape[-2:]
                batch, _ = pad_and_stack([image], None, cfg['mean'], cfg['std'])
                classes_map = model(batch)[0, :, :H, :W].argmax(0)  # (H, W)
                num_classes = len(classes) if classes else int(classes_map.max()) + 1
                picture = draw_segmentation(image, classes_map, num_classes)
                counts = torch.bincount(classes_map.flatten(), minlength=num_classes)
                summary = ', '.join(f'{name(c)} {n / counts.sum():.1%}' for c, n in enumerate(counts.tolist()) if n)
        target = out_dir / f'{Path(path).stem}.png'
        for k in range(1, len(written) + 2):
            if target not in written:
                break
            target = out_dir / f'{Path(path).stem}_{k}.png'
        written.add(target)
        write_png(picture, str(target))
        print(f'{path}: {summary} -> {target}', flush=True)
    return failed
