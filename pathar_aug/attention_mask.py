"""Asymmetric attention visibility of the interleaved prior (paper Eq. 12-13, METHOD-NOTES §2).

Input layout, length T = 2N + 1:  [CLS, s1, ā1, s2, ā2, ..., sN, āN]
  position 0 = CLS (the label), position 2i-1 = s_i, position 2i = ā_i (carries a_{i-1}).
Visibility (True = may attend):
  CLS  sees itself;
  s_i  sees CLS and s_<=i               (so structure never reads any appearance);
  ā_i  sees CLS, s_<=i and ā_<=i        (so a_i is predicted from s_<=i and a_<i).
Every row sees itself, so no row is fully masked (a fully masked softmax row is NaN).

The KV-cache layout used for sampling lives here too, because it is the same visibility written as
cache slots: slots hold [āN, ..., ā1, CLS, s1, ..., sN] (appearance reversed). Then at step i the
keys s_i may see are the contiguous slots [N, N+i], and those ā_i may see are [N-i, N+i]: one
slice of the cache per step and a constant (2, T) step mask, with no gather and no mask rebuilding.
"""
from __future__ import annotations

import torch

CLS, STRUCTURE, APPEARANCE = 0, 1, 2


def sequence_length(num_locations: int) -> int:
    return 2 * num_locations + 1


def position_kinds(num_locations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kind (CLS / STRUCTURE / APPEARANCE) and 1-based location (0 for CLS) of each position."""
    pos = torch.arange(sequence_length(num_locations))
    kind = torch.where(pos == 0, CLS, torch.where(pos % 2 == 1, STRUCTURE, APPEARANCE))
    location = (pos + 1) // 2
    return kind, location


def interleaved_mask(num_locations: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T) bool mask, True where query row may attend to key column."""
    kind, loc = position_kinds(num_locations)
    q_kind, k_kind = kind[:, None], kind[None, :]
    not_after = loc[None, :] <= loc[:, None]
    sees_cls = k_kind == CLS
    sees_structure = (k_kind == STRUCTURE) & (q_kind != CLS) & not_after
    sees_appearance = (k_kind == APPEARANCE) & (q_kind == APPEARANCE) & not_after
    return (sees_cls | sees_structure | sees_appearance).to(device)


def cache_slots(num_locations: int) -> torch.Tensor:
    """Cache slot of each sequence position: CLS -> N, s_i -> N + i, ā_i -> N - i."""
    kind, loc = position_kinds(num_locations)
    n = num_locations
    return torch.where(kind == APPEARANCE, n - loc, n + loc)


def step_key_range(step: int, num_locations: int) -> tuple[int, int]:
    """Slots [lo, hi) read at decoding step ``step`` (0 = CLS alone, i >= 1 = the pair [s_i, ā_i])."""
    n = num_locations
    return n - step, n + step + 1


def step_mask(num_locations: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(2, T) bool mask over cache slots for the query pair [s_i, ā_i]; slice it with step_key_range.

    Row 0 (s_i) may see the CLS/structure half of the cache (slots >= N), row 1 (ā_i) everything in
    its range. Within [N-i, N+i] this is exactly rows 2i-1 and 2i of ``interleaved_mask``.
    """
    slots = torch.arange(sequence_length(num_locations))
    return torch.stack([slots >= num_locations, torch.ones_like(slots, dtype=torch.bool)]).to(device)
