"""Style-Score classifier: a small CNN trained on the user's real patches to tell the labels apart.

The paper uses an ImageNet EfficientNet-B0 fine-tuned on real patches; pretrained weights cannot be
fetched here, so this network is trained from scratch. Its validation accuracy on held-out real
patches is stored with it: a Style Score is only meaningful next to that ceiling.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..device import resolve_device
from ..reporter import Reporter, reporter_for
from .fitting import fingerprint, net_config, save_net, train_steps
from .images import as_uint8_rgb, batched, images_to_tensor


# sized for a CPU: 200 steps of 32 random 48 px crops (of patches resized to 64 px) take under a
# minute on two idle cores; global pooling lets it classify whole 64 px patches afterwards
StyleClassifierConfig = net_config("StyleClassifierConfig", "How the Style-Score classifier is trained.", __name__,
                                   image_size=64, crop=48, width=16, steps=200, batch_size=32, lr=2e-3,
                                   weight_decay=1e-4, val_fraction=0.2, seed=0)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Four conv stages + global average pool; the pooled vector is the embedding."""

    def __init__(self, n_classes: int, width: int = 32):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers.append(_block(cin, w))
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.embed_dim = cin
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(cin, n_classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((x - 0.5) / 0.25).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _augment(x: torch.Tensor, gen: torch.Generator, crop: int) -> torch.Tensor:
    # Geometry only: colour and intensity are exactly what the classifier must learn.
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    if 0 < crop < min(h, w):
        tops = torch.randint(h - crop + 1, (n,), generator=gen).tolist()
        lefts = torch.randint(w - crop + 1, (n,), generator=gen).tolist()
        x = torch.stack([xi[:, t:t + crop, l:l + crop] for xi, t, l in zip(x, tops, lefts)])
    flip_h = torch.rand(n, generator=gen) < 0.5
    flip_v = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
    x = torch.where(flip_v[:, None, None, None], x.flip(-2), x)
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.transpose(-1, -2)
    return x


class StyleClassifier:
    """Label classifier with fit / predict / embed / save / load."""

    def __init__(self, labels: Sequence[str], config: StyleClassifierConfig | None = None, device: str | None = "auto"):
        self.labels = list(labels)
        self.config = config or StyleClassifierConfig()
        self.device = resolve_device(device)
        self.net = SmallCNN(len(self.labels), self.config.width).to(self.device).eval()
        self.val_accuracy: float | None = None
        self.n_train: int = 0

    # ----------------------------------------------------------------------------------- training
    @classmethod
    def fit(
        cls,
        images_by_label: Mapping[str, Sequence[np.ndarray]],
        config: StyleClassifierConfig | None = None,
        device: str | None = "auto",
        progress: bool = True,
        reporter: Reporter | None = None,
    ) -> "StyleClassifier":
        """Train on real images of each label; keeps a stratified validation split for accuracy."""
        labels = sorted(images_by_label)
        if len(labels) < 2:
            raise ValueError("the style classifier needs at least two labels")
        self = cls(labels, config, device)
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        train_x, train_y, val_x, val_y = [], [], [], []
        for y, label in enumerate(labels):
            imgs = [as_uint8_rgb(i) for i in images_by_label[label]]
            if not imgs:
                raise ValueError(f"label {label!r} has no images")
            order = rng.permutation(len(imgs))
            n_val = int(round(len(imgs) * cfg.val_fraction)) if len(imgs) >= 5 else 0
            for j, idx in enumerate(order):
                (val_x if j < n_val else train_x).append(imgs[idx])
                (val_y if j < n_val else train_y).append(y)
        self.n_train = len(train_x)
        # uint8 storage keeps a few thousand patches cheap; batches are converted on the fly
        x_all = (images_to_tensor(train_x, cfg.image_size) * 255).round().to(torch.uint8)
        y_all = torch.tensor(train_y)
        by_class = [torch.nonzero(y_all == c).flatten() for c in range(len(labels))]

        torch.manual_seed(cfg.seed)
        self.net = SmallCNN(len(labels), cfg.width).to(self.device)

        def loss_of_batch(gen: torch.Generator) -> torch.Tensor:
            # class-balanced batches: an over-represented label must not dominate the score
            cls_idx = torch.randint(len(labels), (cfg.batch_size,), generator=gen)
            idx = torch.empty(cfg.batch_size, dtype=torch.long)
            for c, members in enumerate(by_class):
                sel = cls_idx == c
                idx[sel] = members[torch.randint(len(members), (int(sel.sum()),), generator=gen)]
            xb = _augment(x_all[idx].float().div_(255.0), gen, cfg.crop).to(self.device)
            yb = y_all[idx].to(self.device)
            return F.cross_entropy(self.net(xb), yb, label_smoothing=0.05)

        train_steps(self.net, loss_of_batch, cfg.steps, cfg.lr, cfg.weight_decay, 0.15, cfg.seed,
                    reporter_for(reporter, progress=progress), "style classifier")
        if val_x:
            pred = self.predict_indices(val_x)
            self.val_accuracy = float((pred == np.asarray(val_y)).mean())
        return self

    # ---------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def _run(self, images: Sequence[np.ndarray], fn: str, batch_size: int = 64) -> np.ndarray:
        self.net.eval()
        outs = []
        for sl in batched(len(images), batch_size):
            x = images_to_tensor(images[sl], self.config.image_size).to(self.device)
            out = self.net.embed(x) if fn == "embed" else self.net(x).softmax(-1)
            outs.append(out.float().cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, len(self.labels)))

    def predict_proba(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self._run(list(images), "proba")

    def predict_indices(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.predict_proba(images).argmax(-1)

    def predict(self, images: Sequence[np.ndarray]) -> list[str]:
        return [self.labels[i] for i in self.predict_indices(images)]

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Penultimate (pooled) features, a feature space for FID / KID / precision-recall."""
        return self._run(list(images), "embed")

    def style_score(self, images: Sequence[np.ndarray], label: str) -> float:
        """Share of ``images`` classified as ``label`` (the conditioning label); ideal 1."""
        if label not in self.labels:
            raise KeyError(f"label {label!r} unknown to the classifier ({self.labels})")
        if len(images) == 0:
            return float("nan")
        return float((self.predict_indices(images) == self.labels.index(label)).mean())

    # ------------------------------------------------------------------------------- persistence
    @property
    def fingerprint(self) -> str:
        return fingerprint(self.net, "|".join(self.labels).encode())

    def save(self, path: str | Path) -> None:
        save_net(path, self.net, labels=self.labels, config=dataclasses.asdict(self.config),
                 val_accuracy=self.val_accuracy, n_train=self.n_train)

    @classmethod
    def load(cls, path: str | Path, device: str | None = "auto") -> "StyleClassifier":
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        self = cls(state["labels"], StyleClassifierConfig(**state["config"]), device)
        self.net.load_state_dict(state["state_dict"])
        self.net.eval()
        self.val_accuracy = state["val_accuracy"]
        self.n_train = state["n_train"]
        return self
