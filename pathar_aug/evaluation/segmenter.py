"""Image-mask agreement: a small U-Net trained on real pairs, run on generated images.

The Dice between its prediction on a generated image and the mask generated with that image says
whether the pair is coherent (the mask outlines the nuclei the image shows). Its Dice on held-out
real pairs (``val_dice``, or a "real held-out" set) is the ceiling to read generated numbers against.

With K > 2 mask classes (``classes``) the network has K logits per pixel and predicts class maps;
``dice_against`` stays the foreground (any class but background) Dice, ``class_dice_against`` gives
one Dice per foreground class.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..device import resolve_device
from ..metrics import binary_dice, class_dices
from ..reporter import Reporter, reporter_for
from ..tokenizer import class_dice_loss, dice_loss
from .fitting import fingerprint, net_config, save_net, train_steps
from .images import Pair, as_mask, as_uint8_rgb, batched, images_to_tensor


# sized for a CPU: 300 steps of 8 random 64 px crops (of patches resized to 128 px) take about a
# minute on two idle cores; the network is fully convolutional, so it predicts whole patches
SegmenterConfig = net_config("SegmenterConfig", "How the agreement segmenter is trained.", __name__, image_size=128, crop=64,
                             width=12, steps=300, batch_size=8, lr=3e-3, weight_decay=1e-4, val_fraction=0.15, seed=0)


def _norm(c: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: batches of 8 patches give noisy batch statistics
    return nn.GroupNorm(next(g for g in (8, 4, 2, 1) if c % g == 0), c)


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(cout), nn.SiLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), _norm(cout), nn.SiLU(inplace=True),
    )


class SmallUNet(nn.Module):
    """Three-level U-Net (width, 2w, 4w) with a 4w bottleneck; one foreground logit per pixel
    (``classes`` > 2: one logit per class)."""

    def __init__(self, width: int = 16, classes: int = 2):
        super().__init__()
        w = width
        self.enc = nn.ModuleList([_conv(3, w), _conv(w, 2 * w), _conv(2 * w, 4 * w)])
        self.mid = _conv(4 * w, 4 * w)
        self.up = nn.ModuleList([_conv(8 * w, 2 * w), _conv(4 * w, w), _conv(2 * w, w)])
        self.out = nn.Conv2d(w, 1 if classes == 2 else classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - 0.5) / 0.25
        skips = []
        for enc in self.enc:
            h = enc(h)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.mid(h)
        for up, skip in zip(self.up, reversed(skips)):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = up(torch.cat([h, skip], 1))
        out = self.out(h)
        return out[:, 0] if out.shape[1] == 1 else out


def _masks_to_tensor(masks: Sequence[np.ndarray], size: int, classes: int = 2) -> torch.Tensor:
    if classes > 2:  # class maps: nearest resampling keeps them class maps
        t = torch.stack([torch.from_numpy(as_mask(m).astype(np.float32)) for m in masks])[:, None]
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="nearest")
        return t[:, 0]
    t = torch.stack([torch.from_numpy((as_mask(m) > 0).astype(np.float32)) for m in masks])[:, None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="area")
    return (t[:, 0] > 0.5).float()


def _random_crops(
    x: torch.Tensor, y: torch.Tensor, crop: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random ``crop`` x ``crop`` window per sample (no-op when the patch is not larger)."""
    h, w = x.shape[-2:]
    if crop <= 0 or (crop >= h and crop >= w):
        return x, y
    ch, cw = min(crop, h), min(crop, w)
    tops = torch.randint(h - ch + 1, (len(x),), generator=gen).tolist()
    lefts = torch.randint(w - cw + 1, (len(x),), generator=gen).tolist()
    xs = torch.stack([xi[..., t:t + ch, l:l + cw] for xi, t, l in zip(x, tops, lefts)])
    ys = torch.stack([yi[..., t:t + ch, l:l + cw] for yi, t, l in zip(y, tops, lefts)])
    return xs, ys


class Segmenter:
    """Foreground (or K-class) segmenter with fit / predict / dice / save / load."""

    def __init__(self, config: SegmenterConfig | None = None, device: str | None = "auto", classes: int = 2):
        self.config = config or SegmenterConfig()
        self.device = resolve_device(device)
        self.classes = classes
        self.net = SmallUNet(self.config.width, classes).to(self.device).eval()
        self.val_dice: float | None = None
        self.n_train = 0

    @classmethod
    def fit(
        cls,
        pairs: Sequence[Pair],
        config: SegmenterConfig | None = None,
        device: str | None = "auto",
        progress: bool = True,
        reporter: Reporter | None = None,
        classes: int = 2,
    ) -> "Segmenter":
        """Train on real pairs; ``classes`` > 2: masks are class maps 0 .. classes-1."""
        self = cls(config, device, classes)
        cfg = self.config
        pairs = list(pairs)
        if len(pairs) < 2:
            raise ValueError("the segmenter needs at least two real pairs")
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(pairs))
        n_val = int(round(len(pairs) * cfg.val_fraction)) if len(pairs) >= 8 else 0
        val = [pairs[i] for i in order[:n_val]]
        train = [pairs[i] for i in order[n_val:]]
        self.n_train = len(train)
        x_all = (images_to_tensor([p[0] for p in train], cfg.image_size) * 255).round().to(torch.uint8)
        y_all = _masks_to_tensor([p[1] for p in train], cfg.image_size, classes).to(torch.uint8)

        torch.manual_seed(cfg.seed)
        self.net = SmallUNet(cfg.width, classes).to(self.device)

        def loss_of_batch(gen: torch.Generator) -> torch.Tensor:
            idx = torch.randint(len(x_all), (cfg.batch_size,), generator=gen)
            x, y = _random_crops(x_all[idx], y_all[idx], cfg.crop, gen)
            x, y = x.float().div_(255.0), (y.long() if classes > 2 else y.float())
            if torch.rand(1, generator=gen).item() < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            if torch.rand(1, generator=gen).item() < 0.5:
                x, y = x.transpose(-1, -2), y.transpose(-1, -2)
            # mild photometric jitter: generated images are near, not equal to, real appearance
            gain = 1 + 0.2 * (torch.rand(len(x), 1, 1, 1, generator=gen) - 0.5)
            bias = 0.1 * (torch.rand(len(x), 1, 1, 1, generator=gen) - 0.5)
            x = (x * gain + bias).clamp(0, 1).to(self.device)
            y = y.to(self.device)
            logits = self.net(x)
            if classes > 2:
                return F.cross_entropy(logits, y) + class_dice_loss(logits, y)
            return F.binary_cross_entropy_with_logits(logits, y) + dice_loss(logits, y)

        train_steps(self.net, loss_of_batch, cfg.steps, cfg.lr, cfg.weight_decay, 0.1, cfg.seed,
                    reporter_for(reporter, progress=progress), "segmenter")
        if val:
            self.val_dice = float(np.mean(self.dice_against(val)))
        return self

    @torch.no_grad()
    def predict_proba(self, images: Sequence[np.ndarray], batch_size: int = 16) -> list[np.ndarray]:
        """Foreground probability per image (K classes: K x H x W class probabilities), at each
        image's own resolution."""
        images = [as_uint8_rgb(i) for i in images]
        out: list[np.ndarray] = []
        for sl in batched(len(images), batch_size):
            x = images_to_tensor(images[sl], self.config.image_size).to(self.device)
            logits = self.net(x)
            prob = (logits.softmax(1) if self.classes > 2 else logits.sigmoid()[:, None]).float().cpu()
            for img, p in zip(images[sl], prob):
                if p.shape[-2:] != img.shape[:2]:
                    p = F.interpolate(p[None], size=img.shape[:2], mode="bilinear", align_corners=False)[0]
                out.append(p.numpy() if self.classes > 2 else p[0].numpy())
        return out

    def predict(self, images: Sequence[np.ndarray], threshold: float = 0.5) -> list[np.ndarray]:
        """Foreground masks (K classes: uint8 class maps, the most probable class per pixel)."""
        if self.classes > 2:
            return [p.argmax(0).astype(np.uint8) for p in self.predict_proba(images)]
        return [p > threshold for p in self.predict_proba(images)]

    def dice_against(self, pairs: Sequence[Pair]) -> np.ndarray:
        """Dice(segmenter(image), mask) for every (image, mask) pair; ideal 1."""
        pairs = list(pairs)
        preds = self.predict([p[0] for p in pairs])
        return np.asarray([binary_dice(pr, as_mask(m)) for pr, (_, m) in zip(preds, pairs)])

    def class_dice_against(self, pairs: Sequence[Pair]) -> np.ndarray:
        """Dice per foreground class, pairs x (classes - 1): class c of the prediction against
        class c of the mask (1.0 where both lack the class)."""
        pairs = list(pairs)
        preds = self.predict([p[0] for p in pairs])
        return np.asarray([class_dices(pr, as_mask(m), self.classes) for pr, (_, m) in zip(preds, pairs)]
                          ).reshape(len(pairs), self.classes - 1)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.net, b"segmenter")

    def save(self, path: str | Path) -> None:
        save_net(path, self.net, config=dataclasses.asdict(self.config), val_dice=self.val_dice, n_train=self.n_train,
                 classes=self.classes)

    @classmethod
    def load(cls, path: str | Path, device: str | None = "auto") -> "Segmenter":
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        self = cls(SegmenterConfig(**state["config"]), device, int(state.get("classes", 2)))
        self.net.load_state_dict(state["state_dict"])
        self.net.eval()
        self.val_dice = state["val_dice"]
        self.n_train = state["n_train"]
        return self
