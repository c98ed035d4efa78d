"""XCiT's two kinds of attention, as maps: where the class token looks, and how channels mix.

- Class attention (the paper's Figure 4): in the last class-attention block, each
  head's attention from the class token to the patches, a map over the patch grid.
  The softmax also covers the class token itself; its share is left out and the
  map renormalised, so each head's map sums to one over the grid.
- Cross-covariance attention: in a chosen XCA block, each head's d x d matrix
  mixing channels (rows sum to one). It has no spatial layout: that is XCA's point.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class AttentionMaps:
    class_attention: torch.Tensor  # (B, heads, Hp, Wp), each map summing to one
    channel_attention: torch.Tensor  # (B, heads, d, d), each row summing to one
    grid: tuple[int, int]  # (Hp, Wp)
    xca_block: int


def attention_maps(model: nn.Module, images: torch.Tensor, xca_block: int = -1) -> AttentionMaps:
    """Run `model` (an XCiT classifier) on normalised `images` (B, 3, H, W) of any size and collect both maps."""
    from ..models.xcit import XCiT
    if not isinstance(model, XCiT) or not len(model.cls_attn_blocks):
        raise ValueError('attention maps need an XCiT classifier with class-attention blocks')
    depth = len(model.blocks)
    if not -depth <= xca_block < depth:
        raise ValueError(f'xca_block {xca_block} is out of range for a model with {depth} XCA blocks')
    captured = {}

    def keep(key, module):
        def hook(_module, inputs, _output):
            captured[key] = module.attention_map(inputs[0])[0]
        return hook

    handles = [model.blocks[xca_block].attn.register_forward_hook(keep('xca', model.blocks[xca_block].attn)),
               model.cls_attn_blocks[-1].attn.register_forward_hook(keep('cls', model.cls_attn_blocks[-1].attn))]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    Hp, Wp = images.shape[-2:]
    for _ in range(model.patch_size.bit_length() - 1):  # each stride-2 stem conv maps L to ceil(L / 2)
        Hp, Wp = -(-Hp // 2), -(-Wp // 2)
    cls = captured['cls'][:, :, 0, 1:]  # (B, h, N): the class token's weights on the patches
    cls = cls / cls.sum(dim=-1, keepdim=True)
    return AttentionMaps(cls.reshape(*cls.shape[:2], Hp, Wp), captured['xca'], (Hp, Wp), xca_block % depth)


def plot_attention(image: torch.Tensor, maps: AttentionMaps, path: str | Path, index: int = 0,
                   title: str = '') -> Path:
    """A PNG: the input, each head's class-attention map over it, and each head's XCA matrix."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    heads = maps.class_attention.shape[1]
    picture = image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()  # (H, W, 3), pixels in [0, 1]
    H, W = picture.shape[:2]
    overlays = F.interpolate(maps.class_attention[index:index + 1], size=(H, W), mode='bilinear',
                             align_corners=False)[0]  # (h, H, W)
    fig, axes = plt.subplots(2, heads + 1, figsize=(2.6 * (heads + 1), 6.0), squeeze=False)
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title('input')
    for h in range(heads):
        ax = axes[0, h + 1]
        ax.imshow(picture)
        ax.imshow(overlays[h].cpu().numpy(), cmap='inferno', alpha=0.6)
        ax.set_title(f'head {h + 1}: class attention')
    axes[1, 0].axis('off')
    axes[1, 0].text(0.0, 0.5, f'XCA block {maps.xca_block + 1}:\nchannel attention\n(d x d per head)',
                    fontsize=10, va='center')
    for h in range(heads):
        ax = axes[1, h + 1]
        ax.imshow(maps.channel_attention[index, h].cpu().numpy(), cmap='viridis')
        ax.set_title(f'head {h + 1}: {maps.channel_attention.shape[-1]} x {maps.channel_attention.shape[-1]}')
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
