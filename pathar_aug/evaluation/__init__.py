"""Offline generation-quality metrics: distribution distances in named feature spaces, Style Score,
diversity, mask morphology and image-mask agreement. Nothing here downloads weights.

Entry point: ``evaluate_sets`` (report.py). The pieces are usable on their own.
"""
from .distribution import KIDResult, PrecisionRecall, fid, kid, mmd2_unbiased, precision_recall
from .diversity import LPIPS, mean_pairwise_distance
from .features import (
    ColourTextureFeatures,
    FeatureExtractor,
    StyleClassifierFeatures,
    TimmFeatures,
    extract_cached,
    load_state_dict_file,
)
from .report import EvalConfig, default_extractors, evaluate_sets, save_grid, to_markdown
from ..metrics import binary_dice as dice
from .segmenter import Segmenter, SegmenterConfig
from .structure_stats import MaskStats, compare_mask_stats, mask_stats
from .style_classifier import StyleClassifier, StyleClassifierConfig

__all__ = [
    "ColourTextureFeatures", "EvalConfig", "FeatureExtractor", "KIDResult", "LPIPS", "MaskStats",
    "PrecisionRecall", "Segmenter", "SegmenterConfig", "StyleClassifier", "StyleClassifierConfig",
    "StyleClassifierFeatures", "TimmFeatures", "compare_mask_stats", "default_extractors", "dice",
    "evaluate_sets", "extract_cached", "fid", "kid", "load_state_dict_file", "mask_stats",
    "mean_pairwise_distance", "mmd2_unbiased", "precision_recall", "save_grid", "to_markdown",
]
