"""Named presets for dataclass configs, with field overrides (LlamaGen style); the sampling settings.

Every stage owns its config dataclass and a ``{name: config}`` preset table; this module only
knows how to pick a preset and override fields by name, so CLI flags map onto config fields.
``SamplingConfig`` lives here (no torch) so that the command line's options take its defaults.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TypeVar

from nnunet_integration.atomic import atomic_write_text

C = TypeVar("C")


@dataclass
class SamplingConfig:
    """How the prior is sampled (``sampler.sample_tokens``); the defaults are the paper's settings."""

    guidance: float = 1.5  # paper Fig. 7 optimum; 1.0 = plain conditional sampling (no doubling)
    temperature: float = 0.85  # <= 0: greedy
    top_k: int = 100  # <= 0: off
    top_p: float = 0.92  # >= 1: off
    batch_size: int = 32  # images per chunk; the forward batch is twice that with guidance
    seed: int = 0
    compile: bool = False  # torch.compile the step-independent part of the cached step (for CUDA)
    # label index -> sampling fields of that label's rows that differ from the ones above (a run's
    # per-label defaults, ``sampling_defaults``); rows of one setting are sampled together
    by_label: dict[int, dict[str, float]] = field(default_factory=dict)

    def for_label(self, label: int) -> "SamplingConfig":
        """The setting of one label's rows (no per-label part left)."""
        return dataclasses.replace(self, **self.by_label.get(label, {}), by_label={})


def from_preset(presets: Mapping[str, C], name: str, **overrides: Any) -> C:
    """Return preset ``name`` with the non-None ``overrides`` applied (unknown fields raise)."""
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return override(presets[name], **overrides)


def override(cfg: C, **overrides: Any) -> C:
    """dataclasses.replace that ignores None values and names unknown fields in its error."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(k for k in overrides if k not in fields)
    if unknown:
        raise ValueError(f"{type(cfg).__name__} has no field(s) {', '.join(unknown)}")
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Rebuild a config saved with ``to_dict``; tuples come back from JSON lists."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def save_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename) so a killed run never leaves half a file."""
    atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=False) + "\n")
