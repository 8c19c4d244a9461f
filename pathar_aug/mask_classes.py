"""Mask classes: which label ids a run's masks hold, and the border encoding of instance masks.

A run's masks have K classes with the label ids 0 .. K-1 (0 is the background), named as in an
nnU-Net dataset.json ``labels``: from the dataset with ``train --dataset``, from ``--classes`` for
folders (``background=0,interior=1,border=2``), else the binary default (background 0, nucleus 1).
Ids are consecutive from 0 because nnU-Net requires it of the datasets the masks end up in; so a
class index is its label id and nothing is renumbered on the way in or out.

K = 2 is the binary path of the paper: any nonzero mask value is the nucleus (instance ids, 255 ...).
With K > 2 every mask value must be one of the ids; anything else is an error naming the file.

``--mask-mode border`` turns instance masks into the three classes background / interior / border
(the usual way to let a semantic network such as nnU-Net separate touching nuclei):
``instances_to_border`` marks the ring of each instance that touches background or another
instance, ``border_to_instances`` goes back after prediction (connected interiors grown through
the border ring).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries, watershed

from pathar_aug.ingest import IngestError, Sample
from pathar_aug.instance_metrics import instances_from_binary
from pathar_aug.validate import ArgumentError

MASK_MODES = ("classes", "border")  # classes: mask values are label ids; border: instance masks
CLASSES_EXAMPLE = "background=0,interior=1,border=2"
INTERIOR, BORDER = 1, 2


@dataclass(frozen=True)
class MaskClasses:
    """K class names; class i has label id i (0: background)."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.names) < 2:
            raise ValueError(f"masks need at least 2 classes (background and one more), got {list(self.names)}")
        if any(not isinstance(n, str) or not n.strip() for n in self.names):
            raise ValueError(f"class names must be non-empty text, got {list(self.names)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"class names must be unique, got {list(self.names)}")

    @property
    def k(self) -> int:
        return len(self.names)

    @property
    def binary(self) -> bool:
        """Two classes: the paper's binary masks (any nonzero value is the nucleus)."""
        return self.k == 2

    def mapping(self) -> dict[str, int]:
        """As dataset.json ``labels``: name -> id."""
        return {name: i for i, name in enumerate(self.names)}

    def keeps_values(self, mask_mode: str = "classes") -> bool:
        """Whether masks are read with every value kept (``ingest.read_mask``): class ids of K > 2
        classes are, binary and instance masks are not."""
        return not self.binary and mask_mode != "border"

    def describe(self) -> str:
        return ",".join(f"{name}={i}" for i, name in enumerate(self.names))

    @classmethod
    def from_mapping(cls, labels: Mapping[str, int], what: str = "labels") -> MaskClasses:
        """From name -> id (dataset.json ``labels``, or a run's stored classes); ids must be the
        whole numbers 0 .. K-1."""
        if not isinstance(labels, Mapping) or not labels:
            raise ValueError(f"{what}: expected a mapping of class names to label ids, got {labels!r}")
        bad = {n: v for n, v in labels.items() if isinstance(v, bool) or not isinstance(v, int)}
        if bad:
            raise ValueError(f"{what}: label ids must be single whole numbers (region labels are not supported), "
                             f"got {bad}")
        ids = sorted(labels.values())
        if ids != list(range(len(ids))):
            raise ValueError(f"{what}: label ids must be 0, 1, ... K-1 without gaps or repeats (nnU-Net needs "
                             f"consecutive labels), got {dict(labels)}")
        by_id = {v: n for n, v in labels.items()}
        try:
            return cls(tuple(by_id[i] for i in range(len(ids))))
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None

    def to_index(self, mask: np.ndarray, source: str = "mask") -> np.ndarray:
        """A mask read from disk as uint8 class indices H x W. Binary: any nonzero value is 1.
        K > 2: the values must be label ids (``IngestError`` naming ``source`` otherwise)."""
        m = np.asarray(mask)
        if self.binary:
            return (m > 0).astype(np.uint8)
        if m.size and (m.min() < 0 or m.max() >= self.k):
            values = np.unique(m)
            bad = [int(v) for v in values if not 0 <= v < self.k]
            raise IngestError(f"{source}: mask holds value(s) {bad[:10]} that are not label ids of the classes "
                              f"{self.describe()}")
        return m.astype(np.uint8)


BINARY = MaskClasses(("background", "nucleus"))
BORDER_CLASSES = MaskClasses(("background", "interior", "border"))


def parse_classes(text: str, option: str = "--classes") -> MaskClasses:
    """``name=id`` pairs separated by commas, e.g. ``background=0,interior=1,border=2``."""
    entries = [e.strip() for e in str(text).split(",")]
    if not any(entries):
        raise ArgumentError(f"{option} is empty; give name=id pairs such as {CLASSES_EXAMPLE}")
    labels: dict[str, int] = {}
    for entry in entries:
        name, sep, value = (p.strip() for p in entry.partition("="))
        if not sep or not name or not value:
            raise ArgumentError(f"{option}: {entry!r} is not name=id (e.g. {CLASSES_EXAMPLE})")
        try:
            label_id = int(value)
        except ValueError:
            raise ArgumentError(f"{option}: {entry!r}: the id {value!r} is not a whole number") from None
        if name in labels:
            raise ArgumentError(f"{option}: the class {name!r} is named twice")
        if label_id in labels.values():
            raise ArgumentError(f"{option}: the id {label_id} is given twice")
        labels[name] = label_id
    try:
        return MaskClasses.from_mapping(labels, option)
    except ValueError as exc:
        raise ArgumentError(str(exc)) from None


def resolve_classes(classes: str | None, mask_mode: str, dataset_labels: Mapping[str, int] | None = None
                    ) -> MaskClasses:
    """The classes of a new run: ``--mask-mode border`` gives background / interior / border from
    instance masks; a dataset brings its dataset.json labels; folders take ``--classes``, else binary."""
    if mask_mode not in MASK_MODES:
        raise ArgumentError(f"--mask-mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}")
    if mask_mode == "border":
        if dataset_labels is not None:
            raise ArgumentError("--mask-mode border reads instance masks from --masks folders; an nnU-Net dataset "
                                "holds class labels already (train on it without --mask-mode)")
        if classes is not None:
            raise ArgumentError(f"--mask-mode border sets the classes ({BORDER_CLASSES.describe()}); "
                                "leave out --classes")
        return BORDER_CLASSES
    if dataset_labels is not None:
        if classes is not None:
            raise ArgumentError("--classes is for --images/--masks folders; with --dataset the classes are "
                                "dataset.json's labels")
        try:
            return MaskClasses.from_mapping(dataset_labels, "dataset.json labels")
        except ValueError as exc:
            raise IngestError(str(exc)) from None
    return parse_classes(classes) if classes is not None else BINARY


# ----------------------------------------------------------------------------- border encoding


def _check_instances(instances: np.ndarray) -> np.ndarray:
    a = np.asarray(instances)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D instance mask, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"an instance mask holds whole numbers, got {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError("an instance mask has no negative ids")
    return a


def instances_to_border(instances: np.ndarray, width: int = 1) -> np.ndarray:
    """Instance ids (0 background) -> uint8 classes 0 background, 1 interior, 2 border.

    The border is the ring of ``width`` pixels inside each instance next to background or to
    another instance (4-neighbourhood), so touching nuclei are split by 2 * ``width`` border pixels."""
    inst = _check_instances(instances)
    if width < 1:
        raise ValueError(f"border width is at least 1 pixel, got {width}")
    foreground = inst > 0
    border = find_boundaries(inst, connectivity=1, mode="inner", background=0) & foreground
    if width > 1:  # thicker rings grow inwards; a neighbour's own ring covers the other side
        border |= ndimage.binary_dilation(border, iterations=width - 1) & foreground
    out = foreground.astype(np.uint8) * INTERIOR
    out[border] = BORDER
    return out


def border_to_instances(classes: np.ndarray, interior: int = INTERIOR, border: int = BORDER) -> np.ndarray:
    """Background / interior / border classes (e.g. a network's prediction) -> int32 instance ids.

    Each 8-connected interior region seeds one instance, grown through the foreground (interior
    and border) to the pixels nearest to it; foreground with no interior at all (a nucleus too small
    to have one) becomes an instance of its own. 8-connected: the border ring of
    ``instances_to_border`` keeps the interiors of two nuclei from touching even diagonally, and a
    nucleus whose interior narrows to a diagonal step stays one."""
    c = np.asarray(classes)
    if c.ndim != 2:
        raise ValueError(f"expected a 2-D class map, got shape {c.shape}")
    foreground = (c == interior) | (c == border)
    seeds, n = ndimage.label(c == interior, structure=np.ones((3, 3), bool))
    if n:
        distance = ndimage.distance_transform_edt(seeds == 0)  # border pixels join the nearest interior
        grown = watershed(distance, markers=seeds, mask=foreground)
    else:
        grown = np.zeros(c.shape, np.int32)
    rest, _ = ndimage.label(foreground & (grown == 0))
    grown = np.where(rest > 0, rest + n, grown)
    return grown.astype(np.int32)


# ----------------------------------------------------------------------------- samples


def as_classes(mask: np.ndarray, classes: MaskClasses, mask_mode: str = "classes", source: str = "mask"
               ) -> np.ndarray:
    """A mask as read from disk as uint8 class ids of the run: border mode turns instance ids (a
    binary mask: its connected components) into background / interior / border, else
    ``MaskClasses.to_index``."""
    if mask_mode == "border":
        return instances_to_border(mask)
    return classes.to_index(mask, source)


def class_samples(samples: list[Sample], classes: MaskClasses, mask_mode: str = "classes") -> list[Sample]:
    """Samples whose masks are the run's classes (``as_classes``). Binary runs keep their samples as
    they are: tiles take any nonzero value as the nucleus."""
    if classes.binary and mask_mode != "border":
        return samples
    return [dataclasses.replace(s, mask=as_classes(s.mask, classes, mask_mode, str(s.mask_path)).astype(np.int32),
                                multiclass=True) for s in samples]


def class_instances(class_map: np.ndarray, mask_mode: str = "classes") -> np.ndarray:
    """The nuclei of a class map as instance ids: border mode through ``border_to_instances``,
    otherwise the connected components of the foreground (every class but background)."""
    if mask_mode == "border":
        return border_to_instances(class_map)
    return instances_from_binary(np.asarray(class_map) > 0)
