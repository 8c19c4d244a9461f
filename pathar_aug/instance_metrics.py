"""Instance-level segmentation metrics for nuclei: aggregated Jaccard (AJI) and panoptic quality (PQ).

Semantic Dice rewards a prediction that covers the nuclei even when it merges touching ones; nuclei
users count and measure instances, so the study reports these beside Dice. Both take instance maps
(0 = background, any positive id = one object); a semantic prediction becomes instances through its
connected components (``instances_from_binary``).

The overlap counts come from scikit-image's contingency table (one sparse pass over the pixels).
Conventions for tiles without objects: both maps empty -> 1.0 (nothing to find, nothing found),
exactly one empty -> 0.0. The same convention as the study's Dice, so every tile has a value and
tiles can be paired across groups.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.metrics import contingency_table

from pathar_aug.metrics import binary_dice


def instances_from_binary(mask: np.ndarray) -> np.ndarray:
    """Connected components (4-connectivity, as nnU-Net-style semantic predictions are read) as ids 1..K."""
    labels, _ = ndimage.label(np.asarray(mask) > 0)
    return labels.astype(np.int32)


def _overlaps(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersections K_gt x K_pred, gt areas, pred areas) over the objects, background excluded."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"instance maps differ in shape: {gt.shape} vs {pred.shape}")
    _, gt_ids = np.unique(gt, return_inverse=True)
    _, pred_ids = np.unique(pred, return_inverse=True)
    gt_ids, pred_ids = gt_ids.reshape(gt.shape), pred_ids.reshape(pred.shape)
    # after np.unique the background (0, the smallest id) is index 0 whenever it is present
    gt_bg, pred_bg = int(gt.min() == 0), int(pred.min() == 0)
    table = contingency_table(gt_ids, pred_ids).toarray()
    inter = table[gt_bg:, pred_bg:]
    return inter, table.sum(axis=1)[gt_bg:], table.sum(axis=0)[pred_bg:]


def aggregated_jaccard(gt: np.ndarray, pred: np.ndarray) -> float:
    """AJI (Kumar et al., IEEE TMI 2017): every true object is matched to the predicted object of
    highest IoU; intersections and unions are summed over the matches (a true object that no
    prediction touches adds its area to the union), and the areas of predicted objects matched to
    no true object are added to the union."""
    inter, gt_area, pred_area = _overlaps(gt, pred)
    if len(gt_area) == 0 or len(pred_area) == 0:
        return 1.0 if len(gt_area) == len(pred_area) else 0.0
    union = gt_area[:, None] + pred_area[None, :] - inter
    best = np.argmax(inter / union, axis=1)
    rows = np.arange(len(gt_area))
    hit = inter[rows, best] > 0  # a true object no prediction touches adds only its own area
    c = inter[rows, best][hit].sum()
    u = union[rows, best][hit].sum() + gt_area[~hit].sum()
    unused = np.ones(len(pred_area), dtype=bool)
    unused[best[hit]] = False
    u += pred_area[unused].sum()
    return float(c / u)


def panoptic_quality(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> float:
    """PQ (Kirillov et al., CVPR 2019) for one class: objects match when IoU > 0.5 (a match is then
    unique); PQ = sum of matched IoUs / (TP + FP/2 + FN/2)."""
    inter, gt_area, pred_area = _overlaps(gt, pred)
    if len(gt_area) == 0 or len(pred_area) == 0:
        return 1.0 if len(gt_area) == len(pred_area) else 0.0
    iou = inter / (gt_area[:, None] + pred_area[None, :] - inter)
    matched = iou > iou_threshold
    tp = int(matched.sum())
    fp, fn = len(pred_area) - tp, len(gt_area) - tp
    return float(iou[matched].sum() / (tp + 0.5 * fp + 0.5 * fn))


def tile_scores(pred: np.ndarray, gt_instances: np.ndarray, pred_instances: np.ndarray | None = None
                ) -> dict[str, float]:
    """Dice, AJI and PQ of one semantic prediction against a true instance map; the predicted nuclei
    are ``pred_instances`` where given (e.g. recovered from a border map), else the connected
    components of the prediction's foreground."""
    if pred_instances is None:
        pred_instances = instances_from_binary(pred)
    return {"dice": binary_dice(pred, gt_instances), "aji": aggregated_jaccard(gt_instances, pred_instances),
            "pq": panoptic_quality(gt_instances, pred_instances)}
