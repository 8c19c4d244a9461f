"""`pathar-aug benchmark`: real + synthetic Dice scaling study on nnU-Net v2 (paper Sec. IV-C, Table IV).

Question answered: does adding generated pairs to a few real ones improve an nnU-Net segmenter on
real images, and is it better than the two obvious alternatives?

Design (all counts are *per label*; one nnU-Net per group is trained on all labels together and
its Dice is reported per label):

- The user's image/mask folders are split by source image per label (``patches.split_by_image``):
  the held-out images give a fixed real validation set of ``val`` tiles per label, the rest is the
  real training pool. The generator is trained on the pool only (an existing ``--model`` must have
  held every validation image out: each is checked against its run.json ``data.heldout_sources``).
- Images are tiled to the generator's patch size, so real and synthetic cases are the same size and
  nnU-Net's patch equals the tile.
- Groups (paper): I ``real`` real; II ``n`` synthetic only; III-V ``real`` + 100 / 200 / 400
  synthetic. Two more rows at the largest count (``extra_rows``): mask-conditioned rendering (pool
  masks re-rendered by the generator) and a classical baseline (the real tiles expanded with
  dihedral transforms, elastic deformation and colour jitter, ``classical_augment``).
- ONE raw nnU-Net dataset holds the real training tiles, the validation tiles and every synthetic
  case; it is planned (one pinned plans file) and preprocessed once by nnU-Net. Every group (and
  seed) is one fold of a custom splits_final.json with the same real validation cases; nnU-Net's own
  trainer trains it with one schedule for every fold, its own predictor segments the validation tiles.
- Seeds (default 3): each seed draws other real tiles, other synthetic pairs and another nnU-Net
  initialisation; groups of one seed share their real tiles, so differences are paired by seed and
  validation tile. Scores per validation tile: Dice, aggregated Jaccard (AJI) and panoptic quality
  (PQ) against the true instance masks (``instance_metrics``); every difference to group I gets a
  95 % paired bootstrap interval (``bootstrap``).
- Multi-class masks (``--classes``, or ``--mask-mode border`` for instance masks): the dataset takes
  the K classes as its labels, real and synthetic cases hold class ids and nnU-Net segments all K;
  Dice stays the nuclei (every class but the background) against the background, each foreground
  class adds its Dice (``dice_<class>``), and a border study's AJI and PQ take the nuclei
  ``border_to_instances`` recovers from the prediction.
- The schedule is sized to convergence: group I (and the largest real + synthetic group) are also
  scored at 25 / 50 / 75 % of the schedule, from weight snapshots of the same run (the learning
  curve in ``<name>_curve.csv``).
- Resumable: finished stages are recorded; nnU-Net folds with a final checkpoint are not retrained
  and each fold's predictions and scores are cached.

Modules, in the order a study runs: ``settings`` (groups, settings, schedules), ``plan`` (tiles and
folds), ``prepare`` (generator, the raw dataset, nnU-Net preprocessing), ``evaluate`` (training and
scoring every fold), ``report`` (tables, intervals, plot), ``run`` (all of it).

Output (``out``): ``<name>.csv`` (one row per group x label: mean, s.d., delta to group I and its
interval, for Dice, AJI and PQ), ``<name>.md`` (paper layout, one table per metric with the average
over labels), ``<name>.png`` (Dice against synthetic count per label), ``<name>_curve.csv``,
``<name>.json`` (exact settings, data, plans, timings, per-case results).
"""
from pathar_aug.study.evaluate import train_and_evaluate
from pathar_aug.study.plan import Plan, make_plan, pick_tiles
from pathar_aug.study.prepare import Prepared, prepare, preprocess
from pathar_aug.study.report import markdown_table, summarize, write_report
from pathar_aug.study.run import run_benchmark
from pathar_aug.study.settings import (AVERAGE, DEMO_DATA, KIND_CLASSICAL, KIND_FILTERED, KIND_GENERATED, KIND_REAL,
                                       KIND_RENDERED, METRICS, BenchmarkSettings, Group, plan_groups)

__all__ = ["AVERAGE", "DEMO_DATA", "KIND_CLASSICAL", "KIND_FILTERED", "KIND_GENERATED", "KIND_REAL", "KIND_RENDERED", "METRICS",
           "BenchmarkSettings", "Group", "Plan", "Prepared", "make_plan", "markdown_table", "pick_tiles", "plan_groups",
           "prepare", "preprocess", "run_benchmark", "summarize", "train_and_evaluate", "write_report"]
