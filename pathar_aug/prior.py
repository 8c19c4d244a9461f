"""Interleaved autoregressive prior over (structure, appearance) tokens (paper Sec. III-C).

Layout (METHOD-NOTES §2): inputs [CLS(c), s1, ā1, ..., sN, āN] with ā_i = embedding of a_{i-1}
(ā_1 = a learned start token). The structure head reads CLS and s_i to predict s_1 and s_{i+1};
the appearance head reads ā_i to predict a_i. With the mask of ``attention_mask`` this realises
Eq. 12-13 exactly: structure never sees appearance, a_i sees s_<=i and a_<i.

Sampling uses the KV-cache API (``new_cache``, ``start``, ``step``): step 0 feeds CLS, step i feeds
the pair [s_i, ā_i] and returns the logits of s_{i+1} and a_i, so N + 1 steps produce 2N tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention_mask import cache_slots, interleaved_mask, sequence_length, step_key_range, step_mask
from .rope import apply_rotary, rope_tables


@dataclass
class PriorConfig:
    # architecture
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    label_dropout: float = 0.1  # probability of the null label in training (classifier-free guidance)
    rope_base: float = 10000.0
    # optimisation (AdamW as in the paper; no decay on norms / biases / embeddings)
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    batch_size: int = 16
    steps: int = 1000
    epochs: float | None = None  # when set, overrides steps: ceil(epochs * dataset_size / batch_size)
    warmup_steps: int = 0
    cosine: bool = True  # cosine decay to min_lr_ratio * lr after warmup, else constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # every label equally often in a batch: DSB2018's brightfield has 16 images against 541
    # fluorescence ones, and a prior sampled uniformly barely learns the rare labels
    balance_labels: bool = True
    # bookkeeping
    log_every: int = 10
    ckpt_every: int = 500
    eval_every: int = 0  # steps between held-out NLL points of the learning curve (0: at the end only)
    # with that curve, sample with the weights of its lowest point (S + A NLL), not the last step's:
    # on a small cache the prior overfits before the schedule ends (DSB2018 on a GPU: held-out NLL
    # lowest at 60 % of the steps, 2.5 % higher at the end)
    keep_best: bool = True
    eval_sequences: int = 256  # held-out sequences per curve point (the final figure uses all)
    eval_batch_size: int = 32
    seed: int = 0


ARCHITECTURE_FIELDS = ("n_layer", "n_head", "n_embd", "rope_base")

PRIOR_PRESETS: dict[str, PriorConfig] = {
    # Unit tests: seconds on a laptop CPU.
    "tiny": PriorConfig(
        n_layer=2, n_head=2, n_embd=32, lr=3e-3, batch_size=8, steps=60, warmup_steps=0,
        log_every=5, ckpt_every=20, eval_batch_size=16,
    ),
    # About 15 minutes on 2 CPU cores at sequence length 513 (16 x 16 grid): ~1-2 s per step.
    "cpu": PriorConfig(
        n_layer=4, n_head=4, n_embd=256, lr=5e-4, batch_size=8, steps=2000, warmup_steps=50,
        log_every=10, ckpt_every=100, eval_every=250,
    ),
    # Paper setting (Sec. III-C / IV-A): 8 layers, 8 heads, width 512, batch 32, 300 epochs.
    "paper": PriorConfig(
        n_layer=8, n_head=8, n_embd=512, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
        batch_size=32, epochs=300, warmup_steps=1000, cosine=False, log_every=50, ckpt_every=2000,
    ),
}


@dataclass
class KVCache:
    """Preallocated keys/values, (n_layer, B, n_head, 2N + 1, head_dim), in the slot layout of
    ``attention_mask.cache_slots`` ([āN..ā1, CLS, s1..sN])."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


class SelfAttention(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # fused: one matmul per step
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x, cos, sin, mask):
        q, k, v = self._qkv(x, cos, sin)
        p = self.dropout if self.training else 0.0
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p))

    @staticmethod
    def attend_cached(q, k, v, k_cache, v_cache, slots: tuple[int, ...], lo: int, hi: int, mask):
        """Write this step's keys/values into their slots, attend over the slot range [lo, hi)."""
        for j, slot in enumerate(slots):  # plain slice copies: cheaper than index_copy_ here
            k_cache[:, :, slot].copy_(k[:, :, j])
            v_cache[:, :, slot].copy_(v[:, :, j])
        return F.scaled_dot_product_attention(q, k_cache[:, :, lo:hi], v_cache[:, :, lo:hi], attn_mask=mask)


class MLP(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block (GPT-2 style)."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask):
        x = x + self.resid_dropout(self.attn(self.ln1(x), cos, sin, mask))
        return x + self.mlp(self.ln2(x))

    # The cached step is split so that the parts whose shapes do not depend on the step index
    # (step_in, step_out) can be compiled once, while cache writes and slices stay eager.
    def step_in(self, x, cos, sin):
        return self.attn._qkv(self.ln1(x), cos, sin)

    def step_out(self, x, y):
        x = x + self.attn._merge(y)
        return x + self.mlp(self.ln2(x))

    def step(self, x, cos, sin, k_cache, v_cache, slots, lo, hi, mask):
        q, k, v = self.step_in(x, cos, sin)
        return self.step_out(x, self.attn.attend_cached(q, k, v, k_cache, v_cache, slots, lo, hi, mask))


class InterleavedPrior(nn.Module):
    label_names: list[str] | None = None  # set by train_prior.load_prior

    def __init__(
        self,
        cfg: PriorConfig,
        num_structure_codes: int,
        num_appearance_codes: int,
        grid: tuple[int, int],
        num_labels: int,
    ):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
        self.cfg = cfg
        self.num_structure_codes = num_structure_codes
        self.num_appearance_codes = num_appearance_codes
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_locations = self.grid[0] * self.grid[1]
        self.num_labels = num_labels
        self.null_label = num_labels  # extra label index: "no label" for classifier-free guidance
        self.appearance_start = num_appearance_codes  # extra appearance index: the ā_1 start token

        c = cfg.n_embd
        self.label_emb = nn.Embedding(num_labels + 1, c)
        self.structure_emb = nn.Embedding(num_structure_codes, c)
        self.appearance_emb = nn.Embedding(num_appearance_codes + 1, c)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(c)
        self.structure_head = nn.Linear(c, num_structure_codes, bias=False)
        self.appearance_head = nn.Linear(c, num_appearance_codes, bias=False)

        n = self.num_locations
        cos, sin = rope_tables(self.grid, c // cfg.n_head, cfg.rope_base)
        # Non-persistent: derived from the config, rebuilt on load, follow .to(device).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("attn_mask", interleaved_mask(n), persistent=False)
        self.register_buffer("step_attn_mask", step_mask(n), persistent=False)
        slots = cache_slots(n).tolist()
        # Cache slots written at step i: (CLS,) at step 0, (s_i, ā_i) after.
        self.step_slots = [tuple(slots[:1])] + [tuple(slots[2 * i - 1:2 * i + 1]) for i in range(1, n + 1)]

        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ----- teacher-forced pass ---------------------------------------------------------------
    def _flat(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.reshape(tokens.shape[0], -1)
        if tokens.shape[1] > self.num_locations:
            raise ValueError(f"got {tokens.shape[1]} locations, the grid {self.grid} has {self.num_locations}")
        return tokens

    def _drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.cfg.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        return labels

    def _embed(self, labels, structure, appearance_in) -> torch.Tensor:
        """[CLS, s1, ā1, ..., sn, ān] embeddings, (B, 2n + 1, C)."""
        pairs = torch.stack([self.structure_emb(structure), self.appearance_emb(appearance_in)], dim=2)
        return torch.cat([self.label_emb(labels)[:, None], pairs.flatten(1, 2)], dim=1)

    def _shift_appearance(self, appearance: torch.Tensor) -> torch.Tensor:
        """ā inputs: [start, a1, ..., a_{n-1}]."""
        start = torch.full_like(appearance[:, :1], self.appearance_start)
        return torch.cat([start, appearance[:, :-1]], dim=1)

    def hidden(self, labels, structure, appearance_in) -> torch.Tensor:
        """Final hidden states of a prefix of n <= N locations, (B, 2n + 1, C)."""
        x = self.drop(self._embed(labels, structure, appearance_in))
        t = x.shape[1]
        cos, sin, mask = self.rope_cos[:t], self.rope_sin[:t], self.attn_mask[:t, :t]
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.ln_f(x)

    def forward(self, structure: torch.Tensor, appearance: torch.Tensor, labels: torch.Tensor):
        """Teacher-forced logits: structure (B, N, K_s) for s_1..s_N, appearance (B, N, K_a) for a_1..a_N."""
        structure, appearance = self._flat(structure), self._flat(appearance)
        h = self.hidden(self._drop_labels(labels), structure, self._shift_appearance(appearance))
        # structure read at CLS, s_1, ..., s_{N-1}; appearance at ā_1, ..., ā_N
        h_structure = torch.cat([h[:, :1], h[:, 1:-2:2]], dim=1)
        return self.structure_head(h_structure), self.appearance_head(h[:, 2::2])

    def loss(self, structure, appearance, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean per-token NLL (nats) of the structure and the appearance stream (Eq. 15)."""
        s_logits, a_logits = self(structure, appearance, labels)
        s_nll = F.cross_entropy(s_logits.float().flatten(0, 1), self._flat(structure).flatten())
        a_nll = F.cross_entropy(a_logits.float().flatten(0, 1), self._flat(appearance).flatten())
        return s_nll, a_nll

    def prefix_logits(self, labels, structure, appearance_in):
        """No-cache decoding: recompute the whole prefix of i locations (i = 0: CLS only).

        Returns the logits of s_{i+1} and a_i (the latter None for i = 0), like ``step``.
        """
        h = self.hidden(labels, structure, appearance_in)
        s_logits = self.structure_head(h[:, -2 if structure.shape[1] else -1])
        a_logits = self.appearance_head(h[:, -1]) if structure.shape[1] else None
        return s_logits, a_logits

    # ----- KV-cache decoding ------------------------------------------------------------------
    def new_cache(self, batch_size: int, device=None, dtype: torch.dtype | None = None) -> KVCache:
        ref = self.structure_head.weight
        c = self.cfg
        shape = (c.n_layer, batch_size, c.n_head, sequence_length(self.num_locations), c.n_embd // c.n_head)
        k = torch.empty(shape, device=device or ref.device, dtype=dtype or ref.dtype)
        return KVCache(k=k, v=torch.empty_like(k))

    def _decode(self, cache: KVCache, x: torch.Tensor, step: int) -> torch.Tensor:
        t = x.shape[1]
        first = max(2 * step - 1, 0)  # sequence position of this step's first token
        cos, sin = self.rope_cos[first:first + t], self.rope_sin[first:first + t]
        lo, hi = step_key_range(step, self.num_locations)
        # Rows [s_i, ā_i] of the visibility, restricted to the slots [lo, hi): a view, no rebuild.
        mask = self.step_attn_mask[:, lo:hi] if step else None
        slots = self.step_slots[step]
        for layer, block in enumerate(self.blocks):
            x = block.step(x, cos, sin, cache.k[layer], cache.v[layer], slots, lo, hi, mask)
        return self.ln_f(x)

    def start(self, cache: KVCache, labels: torch.Tensor) -> torch.Tensor:
        """Step 0: feed CLS(label) and return the logits of s_1, (B, K_s)."""
        h = self._decode(cache, self.label_emb(labels)[:, None], 0)
        return self.structure_head(h[:, 0])

    def step(self, cache: KVCache, i: int, structure_i: torch.Tensor, appearance_prev: torch.Tensor):
        """Step i (1..N): feed [s_i, ā_i] and return the logits of s_{i+1} and a_i, (B, K_s), (B, K_a).

        ``appearance_prev`` is a_{i-1}, or ``appearance_start`` at i = 1. The structure logits at
        i = N predict past the grid and are to be ignored.
        """
        x = torch.stack([self.structure_emb(structure_i), self.appearance_emb(appearance_prev)], dim=1)
        h = self._decode(cache, x, i)
        return self.structure_head(h[:, 0]), self.appearance_head(h[:, 1])

    def compile_step(self) -> None:
        """torch.compile the step-independent parts of every block (idempotent). Fuses the norms,
        rotary and GELU; most useful on CUDA, where it cuts kernel launches per step."""
        for block in self.blocks:
            if not getattr(block, "_step_compiled", False):
                block.step_in = torch.compile(block.step_in)
                block.step_out = torch.compile(block.step_out)
                block._step_compiled = True

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
