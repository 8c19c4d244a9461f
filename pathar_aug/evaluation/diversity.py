"""Within-set diversity: mean pairwise LPIPS (when its weights are on disk) or feature distance.

LPIPS (Zhang et al. 2018) needs an ImageNet AlexNet / VGG16 backbone plus its small learned
per-channel weights; neither may be downloaded here. ``LPIPS.from_local`` therefore only looks in
places where the files already are (explicit paths, the torch hub cache, an installed ``lpips``
package) and returns None otherwise; callers then report ``mean_pairwise_l2`` in a named feature
space instead, never under the name LPIPS.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..device import resolve_device
from .distribution import pairwise_sq_distances
from .features import load_state_dict_file
from .images import batched, images_to_tensor

# slice boundaries of torchvision's ``.features`` used by LPIPS, and the channels at each tap
_NETS = {
    "alex": {"cuts": (2, 5, 8, 10, 12), "channels": (64, 192, 384, 256, 256), "file": "alexnet-owt-7be5be79.pth"},
    "vgg": {"cuts": (4, 9, 16, 23, 30), "channels": (64, 128, 256, 512, 512), "file": "vgg16-397923af.pth"},
}


def _lpips_package_weights(net: str) -> Path | None:
    """Linear-layer weights shipped inside an installed ``lpips`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "weights" / "v0.1" / f"{net}.pth"
        if p.is_file():
            return p
    return None


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with weights read from local files only.

    ``linear_weights=None`` gives the unlearned variant (all channels weighted 1, "lin-free" in the
    LPIPS paper); its ``name`` then says so, since it is a different number from LPIPS proper.
    """

    def __init__(
        self,
        net: str = "alex",
        backbone_weights: str | Path | None = None,
        linear_weights: str | Path | None = None,
        device: str | None = "auto",
    ):
        super().__init__()
        import torchvision

        if net not in _NETS:
            raise ValueError(f"net must be one of {sorted(_NETS)}")
        if backbone_weights is None:
            raise ValueError("LPIPS needs a local backbone weights file (nothing is downloaded)")
        spec = _NETS[net]
        full = torchvision.models.alexnet(weights=None) if net == "alex" else torchvision.models.vgg16(weights=None)
        sd = load_state_dict_file(backbone_weights)
        missing, _ = full.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k.startswith("features.")]
        if missing:
            raise ValueError(f"{backbone_weights} is not a torchvision {net} checkpoint (missing {missing[:3]})")
        feats = full.features
        self.slices = nn.ModuleList()
        start = 0
        for cut in spec["cuts"]:
            self.slices.append(nn.Sequential(*[feats[i] for i in range(start, cut)]))
            start = cut
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        weights = [torch.ones(c) for c in spec["channels"]]
        if linear_weights is not None:
            lin = load_state_dict_file(linear_weights)
            for i in range(len(weights)):
                key = next((k for k in lin if k.startswith(f"lin{i}.") and k.endswith("weight")), None)
                if key is None or lin[key].numel() != spec["channels"][i]:
                    raise ValueError(f"{linear_weights} is not an LPIPS {net} linear-weights file")
                weights[i] = lin[key].flatten().float()
            if any((w < 0).any() for w in weights):
                raise ValueError("LPIPS linear weights must be non-negative")
        for i, w in enumerate(weights):
            self.register_buffer(f"w{i}", w.view(1, -1, 1, 1))
        self.net = net
        self.learned = linear_weights is not None
        self.name = f"lpips-{net}" if self.learned else f"lpips-{net}-unweighted"
        h = hashlib.sha256(self.name.encode())
        for p in [*self.slices.parameters(), *[getattr(self, f"w{i}") for i in range(len(weights))]]:
            h.update(p.detach().cpu().numpy().tobytes())
        self.fingerprint = h.hexdigest()[:16]
        self.requires_grad_(False)
        self.device = resolve_device(device)
        self.to(self.device).eval()

    @classmethod
    def from_local(
        cls,
        net: str = "alex",
        backbone_weights: str | Path | None = None,
        linear_weights: str | Path | None = None,
        device: str | None = "auto",
    ) -> "LPIPS | None":
        """LPIPS if the backbone file exists locally (given path or torch hub cache), else None.

        Linear weights default to those inside an installed ``lpips`` package, if any.
        """
        if backbone_weights is None:
            candidate = Path(torch.hub.get_dir()) / "checkpoints" / _NETS[net]["file"]
            backbone_weights = candidate if candidate.is_file() else None
        if backbone_weights is None or not Path(backbone_weights).is_file():
            return None
        if linear_weights is None:
            linear_weights = _lpips_package_weights(net)
        return cls(net, backbone_weights, linear_weights, device)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised, sqrt(weight)-scaled features per tap, flattened and scaled by 1/sqrt(HW).

        With these, LPIPS(x, y) = sum over taps of ||f(x) - f(y)||^2, so all pairwise distances
        of a set follow from Gram matrices instead of one network pass per pair.
        """
        h = (x * 2 - 1 - self.shift) / self.scale
        out = []
        for i, sl in enumerate(self.slices):
            h = sl(h)
            f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            f = f * getattr(self, f"w{i}").sqrt()
            out.append(f.flatten(1) / np.sqrt(h.shape[-1] * h.shape[-2]))
        return out

    @torch.no_grad()
    def distance(self, a: Sequence[np.ndarray], b: Sequence[np.ndarray], image_size: int | None = None) -> np.ndarray:
        """LPIPS between a[i] and b[i] for each i."""
        ta = images_to_tensor(list(a), image_size).to(self.device)
        tb = images_to_tensor(list(b), image_size).to(self.device)
        return sum(((fa - fb) ** 2).sum(1) for fa, fb in zip(self._taps(ta), self._taps(tb))).cpu().numpy()

    @torch.no_grad()
    def mean_pairwise(
        self,
        images: Sequence[np.ndarray],
        max_images: int = 64,
        image_size: int | None = 256,
        batch_size: int = 16,
        seed: int = 0,
    ) -> tuple[float, int]:
        """Mean LPIPS over all pairs of (at most ``max_images``, randomly drawn) images.

        Returns (mean, number of images used). Features of all used images are held in memory,
        which bounds ``max_images`` (VGG16 at 256 px: ~30 MB per image).
        """
        images = list(images)
        if len(images) < 2:
            return float("nan"), len(images)
        rng = np.random.default_rng(seed)
        if len(images) > max_images:
            images = [images[i] for i in sorted(rng.choice(len(images), max_images, replace=False))]
        taps: list[list[torch.Tensor]] = []
        for sl in batched(len(images), batch_size):
            x = images_to_tensor(images[sl], image_size).to(self.device)
            taps.append([t.float().cpu() for t in self._taps(x)])
        n = len(images)
        total = torch.zeros(n, n, dtype=torch.float64)
        for level in range(len(taps[0])):
            f = torch.cat([t[level] for t in taps]).double()
            sq = (f * f).sum(1)
            total += sq[:, None] + sq[None, :] - 2 * f @ f.T
        iu = torch.triu_indices(n, n, offset=1)
        return float(total.clamp_min(0)[iu[0], iu[1]].mean()), n


def mean_pairwise_distance(features: np.ndarray, max_samples: int = 2000, seed: int = 0) -> float:
    """Mean Euclidean distance over all distinct pairs of a feature set (feature-space diversity).

    Compare it with the real set's own value in the same feature space: mode collapse pushes it
    down, noise pushes it up.
    """
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        return float("nan")
    if len(f) > max_samples:
        f = f[np.random.default_rng(seed).choice(len(f), max_samples, replace=False)]
    d = np.sqrt(pairwise_sq_distances(f, f))
    iu = np.triu_indices(len(f), k=1)
    return float(d[iu].mean())
