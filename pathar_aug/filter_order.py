"""How many candidates the quality filter draws and which of its passing pairs are kept (a module of
its own: the CLI's options, the study's settings and the evaluation read it without loading the
filter)."""
from __future__ import annotations

# Which passing pairs are kept when more pass than are asked for. "agreement": the best-agreeing
# first (the filter of the paper's spirit: the clearest pairs). "draw": in the order drawn, so the
# kept pairs keep the passing pairs' own mask statistics. Dice favours large objects, and ranking
# by it selects masks with larger nuclei than the real data has (DSB2018, partner-appearance GPU
# run: mean nucleus area of the kept fluorescence masks 707 px against 463 px drawn and 483 px real;
# in draw order 462 px; ``benchmarks.generation_quality --filter-order``).
ORDERS = ("agreement", "draw")
# Candidates drawn per requested pair (sampling cost grows with it); `synthesize` and the Dice study's
# filtered row both draw this many unless told, so that the study judges what the product writes.
DEFAULT_OVERSAMPLE = 3.0
MAX_OVERSAMPLE = 10.0  # a hard bound: the filter never draws more than this many per requested pair
# Which passing pairs are kept unless told: as drawn. In the DSB2018 Dice study with the partner GPU
# generator, draw order against the ranking on the same group I: Dice +0.018 [-0.002, +0.039], AJI
# +0.032 [+0.005, +0.060] on average, histology AJI +0.051 and PQ +0.064 (benchmarks/results/
# dice_compare_draw.md).
DEFAULT_ORDER = "draw"
# The order meant where none is recorded: settings and manifests written before the order was an
# option leave it out and were ranked. Writers leave this order out too, so that those resume.
UNRECORDED_ORDER = "agreement"


def check_order(order: str) -> str:
    """``order`` when it is one of ``ORDERS``; else a ValueError naming the option."""
    if order not in ORDERS:
        raise ValueError(f"--filter-order must be one of {', '.join(ORDERS)}, got {order!r}")
    return order
