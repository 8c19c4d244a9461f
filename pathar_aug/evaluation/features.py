"""Named feature spaces for FID / KID / precision-recall / feature diversity.

Every extractor carries a ``name`` that ends up next to each number it produced, so a result is
only ever called e.g. "KID [DINOv2 ViT-L/14]" when those weights were really loaded. Nothing here
downloads anything: weights come from the user's real images (StyleClassifierFeatures), from a
local file (TimmFeatures), or there are none (ColourTextureFeatures, a clearly named fallback).
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from nnunet_integration.atomic import atomic_write_bytes
from nnunet_integration.names import file_part

from ..device import resolve_device
from .images import as_uint8_rgb, batched, hash_arrays, images_to_tensor
from .style_classifier import StyleClassifier

log = logging.getLogger(__name__)


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps a list of uint8 HxWx3 images to an (N, D) float array."""

    name: str  # the feature space, printed next to every metric computed in it

    @property
    def fingerprint(self) -> str:
        """Changes whenever the weights or preprocessing change (feature-cache key)."""
        ...

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray: ...


# ------------------------------------------------------------------------- style classifier space
class StyleClassifierFeatures:
    """Pooled penultimate features of the Style-Score classifier trained on the user's real images."""

    def __init__(self, classifier: StyleClassifier, name: str = "style-classifier"):
        self.classifier = classifier
        self.name = name

    @property
    def fingerprint(self) -> str:
        return f"{self.name}:{self.classifier.fingerprint}"

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.classifier.embed(list(images))


# ----------------------------------------------------------------------- timm backbone, local file
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "teacher", "module", "net", "params")


def load_state_dict_file(path: str | Path, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Read a local .safetensors / .pth / .bin / .pt file into a flat tensor state dict.

    Unwraps the usual containers ({'model': ...}, {'state_dict': ...}, DINO {'teacher': ...}) and
    the 'module.' / '_orig_mod.' / 'backbone.' prefixes of DDP, torch.compile and DINO training.
    ``trusted=True`` allows pickled non-tensor objects (only for files you trust).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not trusted)
        except Exception as exc:  # pickle with non-tensor objects
            raise ValueError(
                f"could not read {path} as a plain tensor checkpoint ({exc}); if you trust the file, "
                "pass trusted=True"
            ) from exc
    for _ in range(3):
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        # DINO-style checkpoints: keep the backbone, drop projection heads
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if not sd:
        raise ValueError(f"{path} contains no tensors")
    return sd


class TimmFeatures:
    """Pooled features of any timm architecture with weights from a local file.

    ``timm.create_model(model_name, pretrained=False, num_classes=0)`` builds the network without
    touching the network; the state dict is then read from ``weights_path`` and passed through the
    architecture's own ``checkpoint_filter_fn`` (which converts e.g. original DINOv2 checkpoints and
    resamples position embeddings). Every backbone parameter must be found in the file, otherwise
    this raises: a partly random network must never be reported under a pretrained model's name.

    Examples: DINOv2 ViT-L/14: ``TimmFeatures("vit_large_patch14_dinov2", "dinov2_vitl14.pth",
    name="DINOv2-ViT-L/14", model_kwargs={"img_size": 224})``. UNI:
    ``TimmFeatures("vit_large_patch16_224", "uni/pytorch_model.bin", name="UNI",
    model_kwargs={"init_values": 1e-5, "dynamic_img_size": True})``.
    """

    def __init__(
        self,
        model_name: str,
        weights_path: str | Path,
        name: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        image_size: int | tuple[int, int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_size: int = 32,
        device: str | None = "auto",
        trusted: bool = False,
    ):
        import timm  # imported here: importing timm costs seconds and only this class needs it

        if model_name.split(":", 1)[0] in ("hf-hub", "hf_hub"):
            # such names make timm fetch a config from the hub; use the architecture name instead
            raise ValueError(f"{model_name!r} needs the network; pass a timm architecture name "
                             "(e.g. 'vit_large_patch16_224') plus the local weights file")
        self.model_name = model_name
        self.weights_path = Path(weights_path)
        self.name = name or f"{model_name}[{self.weights_path.name}]"
        self.model_kwargs = dict(model_kwargs or {})
        self.batch_size = batch_size
        self.device = resolve_device(device)

        state_dict = load_state_dict_file(self.weights_path, trusted=trusted)
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **self.model_kwargs)
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                state_dict = filter_fn(state_dict, model)
            except Exception as exc:  # filters assume their own formats; a plain dict may not need one
                log.debug("checkpoint_filter_fn of %s not applied: %s", model_name, exc)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing:
            raise ValueError(
                f"{self.weights_path} does not fit {model_name}: {len(missing)} parameters missing "
                f"(e.g. {', '.join(missing[:5])}); check model_name / model_kwargs"
            )
        # classifier heads and training-only tensors are expected leftovers (num_classes=0)
        self.unexpected_keys = list(unexpected)
        if unexpected:
            log.info("%s: ignored %d checkpoint tensors (e.g. %s)", self.name, len(unexpected), unexpected[:3])
        self.model = model.to(self.device).eval()

        data_cfg = timm.data.resolve_model_data_config(model)
        size = image_size or self._native_size(model) or tuple(data_cfg["input_size"][1:])
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(mean or data_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std or data_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
        stat = self.weights_path.stat()
        self._fingerprint = hashlib.sha256(
            json.dumps(
                [model_name, str(self.weights_path.resolve()), stat.st_size, stat.st_mtime_ns,
                 self.image_size, self.mean.flatten().tolist(), self.std.flatten().tolist(),
                 sorted((k, repr(v)) for k, v in self.model_kwargs.items())]
            ).encode()
        ).hexdigest()[:16]

    @staticmethod
    def _native_size(model: torch.nn.Module) -> tuple[int, int] | None:
        """A ViT built with img_size=... only accepts that size (unless dynamic_img_size)."""
        patch_embed = getattr(model, "patch_embed", None)
        size = getattr(patch_embed, "img_size", None)
        if size is None or getattr(model, "dynamic_img_size", False):
            return None
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def fingerprint(self) -> str:
        return f"{self.name}:{self._fingerprint}"

    @torch.no_grad()
    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        images = list(images)
        outs = []
        for sl in batched(len(images), self.batch_size):
            # whole patch resized (no centre crop): nuclei at the border count as much as the rest
            x = images_to_tensor(images[sl], self.image_size)
            x = ((x - self.mean) / self.std).to(self.device)
            feats = self.model(x)
            outs.append(feats.float().flatten(1).cpu().numpy())
        return np.concatenate(outs)


# ------------------------------------------------------------------------ fallback, no weights
class ColourTextureFeatures:
    """Hand-made 70-D descriptor: per-channel colour histograms, mean / std, gradient histogram.

    No learned weights at all, so it only sees colour and coarse texture statistics; numbers in
    this space are named "colour-texture-histograms" and are no substitute for a deep feature space.
    """

    def __init__(self, bins: int = 16, name: str = "colour-texture-histograms"):
        self.bins = bins
        self.name = name

    @property
    def fingerprint(self) -> str:
        return f"{self.name}:v1:bins={self.bins}"

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        rows = []
        for image in images:
            img = as_uint8_rgb(image).astype(np.float64)
            n = img.shape[0] * img.shape[1]
            hists = [np.histogram(img[..., c], bins=self.bins, range=(0, 256))[0] / n for c in range(3)]
            stats = np.concatenate([img.mean((0, 1)), img.std((0, 1))]) / 255.0
            gy, gx = np.gradient(img.mean(-1))
            # sqrt spreads the heavy tail of gradient magnitudes over the bins
            mag = np.sqrt(np.hypot(gx, gy))
            grad = np.histogram(mag, bins=self.bins, range=(0, np.sqrt(255.0 * np.sqrt(2)) + 1e-6))[0] / n
            rows.append(np.concatenate([*hists, stats, grad]))
        return np.asarray(rows, dtype=np.float32)


# ------------------------------------------------------------------------------------- caching
def extract_cached(
    extractor: FeatureExtractor, images: Sequence[np.ndarray], cache_dir: str | Path | None = None
) -> np.ndarray:
    """``extractor.extract(images)``, stored as .npy keyed by the image bytes and the extractor."""
    images = [as_uint8_rgb(i) for i in images]
    if cache_dir is None:
        return np.asarray(extractor.extract(images), dtype=np.float32)
    key = hash_arrays(images, extra=extractor.fingerprint)
    path = Path(cache_dir) / f"{file_part(extractor.name)}-{key}.npy"
    if path.is_file():
        return np.load(path)
    feats = np.asarray(extractor.extract(images), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: np.save(f, feats))
    return feats
