"""Metrics: the one binary Dice (and per class), PSNR, and the tokenizer's reconstruction report
(codebook usage per label, a token-resolution baseline)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from pathar_aug.quantizer import codebook_usage

if TYPE_CHECKING:
    from pathar_aug.patches import PatchSet
    from pathar_aug.tokenizer import DualVQTokenizer


def binary_dice(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
    """Dice of two masks, any positive value being foreground, pooled over all their pixels (a batch
    of masks gives the pooled Dice); 1.0 when both are empty (nothing to find, nothing found)."""
    p, t = np.asarray(pred) > 0, np.asarray(target) > 0
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom)


def class_dices(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, classes: int) -> list[float]:
    """Dice of each foreground class 1 .. classes-1 of two class maps (``binary_dice`` of the pixels
    of that class: 1.0 where both lack it)."""
    p, t = np.asarray(pred), np.asarray(target)
    return [binary_dice(p == c, t == c) for c in range(1, classes)]


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB between two uint8 image batches, over all their pixels."""
    mse = F.mse_loss(x.float(), y.float()).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(255.0 ** 2 / mse)).item()


def token_resolution_baseline(images: torch.Tensor, masks: torch.Tensor, r: int, classes: int = 2
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """What a grid of h x w averages keeps: area-downsample by r, upsample bilinearly (K > 2
    ``classes``: each class's share, then the most likely class).

    A tokenizer that does not beat this on PSNR and Dice has learned nothing beyond the grid.
    """
    size = images.shape[-2:]
    img = F.interpolate(F.avg_pool2d(images.float(), r), size=size, mode="bilinear", align_corners=False)
    if classes > 2:
        onehot = F.one_hot(masks[:, 0].long(), classes).permute(0, 3, 1, 2).float()
        share = F.interpolate(F.avg_pool2d(onehot, r), size=size, mode="bilinear", align_corners=False)
        return img.round().clamp(0, 255).to(torch.uint8), share.argmax(1, keepdim=True).to(torch.uint8)
    msk = F.interpolate(F.avg_pool2d(masks.float(), r), size=size, mode="bilinear", align_corners=False)
    return img.round().clamp(0, 255).to(torch.uint8), (msk > 0.5).to(torch.uint8)


@torch.no_grad()
def reconstruction_report(model: DualVQTokenizer, patches: PatchSet, device: torch.device,
                          batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Per label: image PSNR and mask Dice of the round trip, the same for the token-resolution
    baseline, and the share of each codebook used by these patches. Multi-class tokenizers add the
    Dice of each foreground class (``mask_dice_class<c>``, ``baseline_mask_dice_class<c>``)."""
    model.eval()
    report = {}
    for li, label in enumerate(patches.label_names):
        part = patches.subset(torch.nonzero(patches.labels == li).flatten())
        if len(part) == 0:
            continue
        rec, pred, s_all, a_all = [], [], [], []
        for start in range(0, len(part), batch_size):
            images = part.images[start:start + batch_size].to(device)
            masks = part.masks[start:start + batch_size].to(device)
            s, a = model.encode(images, masks)
            r_img, r_mask = model.decode(s, a)
            rec.append(r_img.cpu())
            pred.append(r_mask.cpu())
            s_all.append(s.cpu())
            a_all.append(a.cpu())
        rec, pred = torch.cat(rec), torch.cat(pred)
        k = model.cfg.num_classes
        base_img, base_mask = token_resolution_baseline(part.images, part.masks, model.cfg.downsample, k)
        report[label] = {
            "patches": len(part),
            "psnr": psnr(rec, part.images),
            "mask_dice": binary_dice(pred, part.masks),
            "usage_structure": codebook_usage(torch.cat(s_all), model.cfg.structure_codes),
            "usage_appearance": codebook_usage(torch.cat(a_all), model.cfg.appearance_codes),
            "baseline_psnr": psnr(base_img, part.images),
            "baseline_mask_dice": binary_dice(base_mask, part.masks),
        }
        if k > 2:
            for name, mask in (("mask_dice", pred), ("baseline_mask_dice", base_mask)):
                for c, dice in enumerate(class_dices(mask, part.masks, k), start=1):
                    report[label][f"{name}_class{c}"] = dice
    return report
