"""Vector quantiser that keeps its codebook alive on a few hundred images.

Nearest-code assignment (paper Eq. 7) on l2-normalised vectors (cosine lookup), the standard
stop-gradient VQ loss (codebook + 0.25 x commitment) and a straight-through gradient. Small data
kills codes; three things keep them alive (METHOD-NOTES §1): normalised low-d codes, a data
initialisation from the first batch of encoder outputs, and restarting codes unused for a while
from current encoder outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pathar_aug import distributed


class VectorQuantizer(nn.Module):
    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, dead_after: int = 200):
        super().__init__()
        self.num_codes, self.dim, self.beta, self.dead_after = num_codes, dim, beta, dead_after
        self.codebook = nn.Embedding(num_codes, dim)
        nn.init.normal_(self.codebook.weight)
        # steps since each code was last chosen; and whether the data init has happened
        self.register_buffer("idle_steps", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(False))

    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook.weight, dim=-1)

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of z (N x d); cosine = l2 on normalised vectors."""
        z = F.normalize(z.float(), dim=-1)
        return (z @ self.codes().t()).argmax(dim=-1)

    def assign_map(self, z_map: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices B x h x w for an encoder output map B x d x h x w (no side effects)."""
        b, d, h, w = z_map.shape
        return self.assign(z_map.permute(0, 2, 3, 1).reshape(-1, d)).reshape(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for an index grid (B x h x w) as a feature map (B x d x h x w)."""
        return F.embedding(indices, self.codes()).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def _reseed(self, which: torch.Tensor, z: torch.Tensor) -> None:
        """Point the chosen codes at random current encoder outputs (with a little noise)."""
        n = int(which.sum())
        if n == 0:
            return
        # Under DDP (``which`` is the same on every rank): rank 0 draws from the global batch's
        # vectors, in single-process order, and every rank takes its codebook.
        z = distributed.all_gather_rows(z)
        if distributed.is_main():
            pick = torch.randint(0, z.shape[0], (n,), device=z.device)
            new = z[pick] + 0.01 * torch.randn(n, self.dim, device=z.device)
            self.codebook.weight.data[which] = new.to(self.codebook.weight.dtype)
        distributed.broadcast_(self.codebook.weight.data)
        self.idle_steps[which] = 0

    def forward(self, z_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_map B x d x h x w -> (quantised map with straight-through grad, indices B x h x w, VQ loss)."""
        b, d, h, w = z_map.shape
        z = F.normalize(z_map.permute(0, 2, 3, 1).reshape(-1, d).float(), dim=-1)
        if self.training and not bool(self.initialised):
            self._reseed(torch.ones(self.num_codes, dtype=torch.bool, device=z.device), z.detach())
            self.initialised.fill_(True)
        indices = (z @ self.codes().t()).argmax(dim=-1)
        q = self.codes()[indices]
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        q = z + (q - z).detach()  # straight-through: decoder gradient flows to the encoder
        if self.training:
            with torch.no_grad():
                used = torch.zeros(self.num_codes, dtype=torch.bool, device=z.device)
                used[indices] = True
                used = distributed.all_max(used.to(torch.uint8)).bool()  # codes any rank chose
                self.idle_steps += 1
                self.idle_steps[used] = 0
                self._reseed(self.idle_steps > self.dead_after, z.detach())
        q_map = q.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return q_map.to(z_map.dtype), indices.reshape(b, h, w), loss


def codebook_usage(indices: torch.Tensor, num_codes: int) -> float:
    """Share of codes hit at least once by a set of token grids (the paper's usage figure)."""
    return torch.unique(indices).numel() / num_codes
