"""2D rotary position embedding (RoPE) for the interleaved sequence [CLS, s1, ā1, ..., sN, āN].

Each attention head's dimensions are paired as (d, d + head_dim/2) (the usual rotate-half layout).
The first half of the pairs rotates with the grid row, the second half with the grid column, so
half of every head's dimensions encode the row and half the column. s_i and ā_i sit at the same
grid location and get the same rotation (paper: Pos(s_i) = Pos(a_i)); CLS has no grid location
and gets the identity rotation (cos 1, sin 0), so it is seen the same way from everywhere.
"""
from __future__ import annotations

import torch


def grid_positions(grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each of the h*w locations, in raster order (location i = row * w + col)."""
    h, w = grid
    index = torch.arange(h * w)
    return index // w, index % w


def rope_tables(
    grid: tuple[int, int],
    head_dim: int,
    base: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (2N + 1, head_dim) float32, for [CLS, s1, ā1, ..., sN, āN].

    Row 0 (CLS) is the identity rotation; rows 2i-1 and 2i (s_i and ā_i) share location i's angles.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv_freq = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = grid_positions(grid)
    # (N, head_dim / 2): row angles on the first half of the pairs, column angles on the second.
    angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=1)
    angles = angles.repeat_interleave(2, dim=0)  # s_i and ā_i: same location, same angles
    angles = torch.cat([torch.zeros(1, head_dim // 2, dtype=angles.dtype), angles])  # CLS: angle 0
    angles = torch.cat([angles, angles], dim=1)  # pair (d, d + head_dim/2) shares one angle
    return angles.cos().float().to(device), angles.sin().float().to(device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys ``x`` (..., T, head_dim) by the (T, head_dim) tables.

    Computed in float32 and cast back, so bf16 activations under autocast keep exact angles.
    """
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
