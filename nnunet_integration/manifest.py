"""The record of synthetic cases kept beside dataset.json, so that they can be told apart and undone.

``pathar_aug_manifest.json`` (in the raw dataset folder; nnU-Net ignores extra files there) holds
- the exact text of dataset.json before the first synthetic write (restored byte for byte),
- one entry per batch: who made it (a free ``settings`` dict: model, checkpoint, sampling ...),
- one entry per synthetic case with its files and state: ``pending`` (registered, files may be
  partly written, not yet in dataset.json) or ``committed`` (listed in dataset.json),
  its ``condition`` label (the modality / organ label it was generated for) and, when the quality
  filter chose it, its ``scores`` (image-mask agreement, foreground share, empty / full, the
  threshold it passed),
- the splits file it changed and that file's original text (``None``: it did not exist).

Real cases written by this tool have their condition labels in ``pathar_aug_labels.json`` beside it
(``load_labels``), so that every case's label is data, never parsed back out of its name.

Invariant kept at every instant: every synthetic case in dataset.json and every synthetic file on
disk is in the manifest, so ``clean_synthetic`` can always remove exactly what was added.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from nnunet_integration.atomic import atomic_write_json
from nnunet_integration.paths import FILE_ENDING

MANIFEST_NAME = "pathar_aug_manifest.json"
LABELS_NAME = "pathar_aug_labels.json"  # {real case: condition label}
FORMAT = "pathar-aug synthetic case manifest"
VERSION = 1

# Reserved prefix of every synthetic case: "pathar_<batch>_<case_id>". Real cases may not use it,
# so a synthetic name can never collide with a real one and stays recognisable in any listing.
SYNTHETIC_PREFIX = "pathar_"
_BATCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]{0,31}$")  # no '_': the name splits unambiguously
_CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,99}$")

PENDING, COMMITTED = "pending", "committed"
CASE_SCORES = "scores"  # optional per-case data: the quality filter's scores of the pair
CASE_CONDITION = "condition"  # optional per-case data: the condition label the pair was made for


class ManifestError(RuntimeError):
    """The manifest is missing, unreadable or contradicts the dataset."""


def check_batch_tag(batch: str) -> str:
    if not _BATCH_RE.match(batch):
        raise ValueError(f"batch tag {batch!r} must be 1-32 letters, digits or '-' (no '_')")
    return batch


def check_case_id(case_id: str) -> str:
    if not isinstance(case_id, str) or not _CASE_ID_RE.match(case_id):
        raise ValueError(f"case id {case_id!r} must be 1-100 letters, digits, '_' or '-'")
    return case_id


def synthetic_case_name(batch: str, case_id: str) -> str:
    return f"{SYNTHETIC_PREFIX}{check_batch_tag(batch)}_{check_case_id(case_id)}"


def synthetic_case_id(batch: str, name: str) -> str:
    """The case id inside a synthetic case name of ``batch`` (the inverse of ``synthetic_case_name``)."""
    prefix = f"{SYNTHETIC_PREFIX}{batch}_"
    if not name.startswith(prefix):
        raise ValueError(f"{name!r} is not a case of batch {batch!r}")
    return name[len(prefix):]


def settings_batch_tag(settings: Mapping[str, Any]) -> str:
    """Deterministic default batch tag: the same settings give the same tag, so reruns resume."""
    canonical = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return "s" + hashlib.sha256(canonical.encode()).hexdigest()[:8]


def case_files(name: str) -> tuple[str, str]:
    """(image, label) paths relative to the dataset folder, in NaturalImage2DIO's layout."""
    return f"imagesTr/{name}_0000{FILE_ENDING}", f"labelsTr/{name}{FILE_ENDING}"


def json_safe(data: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy of a settings or scores dict (numpy numbers become plain ones)."""
    return json.loads(json.dumps(dict(data), default=_plain))


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars
    return item() if callable(item) else str(value)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Manifest:
    original_dataset_json: str
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    splits: dict[str, Any] | None = None

    def names(self, state: str | None = None) -> list[str]:
        return [n for n, c in self.cases.items() if state is None or c["state"] == state]

    def scores(self, name: str) -> dict[str, Any] | None:
        """The quality scores recorded with a case (None: written without the filter)."""
        return self.cases[name].get(CASE_SCORES)

    def add_batch(self, batch: str, settings: Mapping[str, Any]) -> None:
        settings = json.loads(json.dumps(dict(settings), default=str))  # JSON-safe copy
        known = self.batches.get(batch)
        if known is None:
            self.batches[batch] = {"created": _now(), "settings": settings}
        elif known["settings"] != settings:
            raise ManifestError(
                f"batch {batch!r} was written with other settings ({known['settings']}); "
                "use another batch tag for different settings"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "case_prefix": SYNTHETIC_PREFIX,
            "original_dataset_json": self.original_dataset_json,
            "original_dataset_json_sha256": sha256_text(self.original_dataset_json),
            "splits": self.splits,
            "batches": self.batches,
            "cases": self.cases,
        }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def manifest_path(dataset_dir: Path) -> Path:
    return Path(dataset_dir) / MANIFEST_NAME


def load_manifest(dataset_dir: Path) -> Manifest | None:
    path = manifest_path(dataset_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read {path}: {e}") from e
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ManifestError(f"{path} is not a version-{VERSION} pathar-aug manifest")
    original = data["original_dataset_json"]
    if sha256_text(original) != data.get("original_dataset_json_sha256"):
        raise ManifestError(f"{path}: the saved original dataset.json does not match its checksum")
    return Manifest(original, data.get("batches", {}), data.get("cases", {}), data.get("splits"))


def save_manifest(dataset_dir: Path, manifest: Manifest) -> None:
    atomic_write_json(manifest_path(dataset_dir), manifest.to_json())


def load_labels(dataset_dir: Path) -> dict[str, str]:
    """Condition labels of the real cases this tool wrote ({} when none were recorded)."""
    path = Path(dataset_dir) / LABELS_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def save_labels(dataset_dir: Path, labels: Mapping[str, str]) -> None:
    """Add ``labels`` to the recorded real-case labels (the file is rewritten only when they change)."""
    known = load_labels(dataset_dir)
    merged = {**known, **labels}
    path = Path(dataset_dir) / LABELS_NAME
    if merged != known or not path.is_file():
        atomic_write_json(path, merged)
