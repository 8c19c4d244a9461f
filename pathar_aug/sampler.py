"""Batched sampling from the interleaved prior (paper Sec. III-D).

All images of a chunk are decoded in lockstep with a KV cache: step 0 feeds CLS, step i feeds
[s_i, ā_i] and yields the logits of s_{i+1} and a_i, so N + 1 forward steps make 2N tokens.
Classifier-free guidance doubles the batch (conditional rows, then null-label rows) and combines
both heads' logits as u + g (c - u); then temperature, top-k and top-p filtering.
Mask-conditioned rendering ((L+M)2I) teacher-forces the given structure and samples appearance.

``sample_tokens_nocache`` recomputes the whole prefix at every step; it exists as the reference
for the speed benchmark and the equivalence tests.
"""
from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .config import SamplingConfig  # noqa: F401 - its home is config (no torch); imported from here too
from .device import autocast
from .prior import InterleavedPrior

if TYPE_CHECKING:
    from .reporter import Reporter


def _candidates(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Sorted (values, indices) of the top-k, with values outside the top-p nucleus set to -inf;
    None when neither filter is active."""
    vocab = logits.shape[-1]
    use_k, use_p = 0 < top_k < vocab, top_p < 1.0
    if not (use_k or use_p):
        return None
    # topk already returns sorted values: top-p then only sorts k entries instead of V
    values, index = logits.topk(top_k if use_k else vocab, dim=-1)
    if use_p:
        probs = values.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        values = values.masked_fill(mass_before > top_p, float("-inf"))
    return values, index


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf. (..., V) -> (..., V).

    The nucleus is the smallest set of most likely tokens (of the top-k) whose probability reaches
    top_p; the most likely token is always kept.
    """
    kept = _candidates(logits, top_k, top_p)
    if kept is None:
        return logits
    values, index = kept
    return torch.full_like(logits, float("-inf")).scatter(-1, index, values)


def sample_from_logits(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """One token per row of (B, V) logits, (B,) long: temperature, then top-k / top-p, then a draw.

    Draws among the k candidates only (same distribution as ``filter_logits`` + softmax over V,
    without a V-wide random draw per row).
    """
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    kept = _candidates(logits, cfg.top_k, cfg.top_p)
    if kept is None:
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
    values, index = kept
    choice = torch.multinomial(values.softmax(dim=-1), 1, generator=generator)
    return index.gather(-1, choice).squeeze(1)


class GuidedDecoder:
    """start()/step() over a chunk of B images, returning guided (B, K) logits.

    With guidance != 1 the prior runs on 2B rows: labels then null labels, same tokens for both.
    ``use_cache=False`` recomputes the whole prefix each step (no-cache reference).
    """

    def __init__(self, prior: InterleavedPrior, labels: torch.Tensor, guidance: float,
                 use_cache: bool = True, compile: bool = False):
        self.prior, self.guidance = prior, guidance
        self.doubled = guidance != 1.0
        if self.doubled:
            labels = torch.cat([labels, torch.full_like(labels, prior.null_label)])
        self.labels = labels
        rows, n = len(labels), prior.num_locations
        self.cache = None
        if use_cache:
            # store keys/values in the dtype autocast computes them in (bf16 on CUDA)
            autocasting = labels.device.type == "cuda" and torch.is_autocast_enabled("cuda")
            dtype = torch.get_autocast_dtype("cuda") if autocasting else None
            self.cache = prior.new_cache(rows, device=labels.device, dtype=dtype)
        else:
            self.structure = torch.empty(rows, n, dtype=torch.long, device=labels.device)
            self.appearance_in = torch.empty(rows, n, dtype=torch.long, device=labels.device)
        if compile and use_cache:
            prior.compile_step()

    def _guide(self, logits: torch.Tensor | None) -> torch.Tensor | None:
        if not self.doubled or logits is None:
            return logits
        cond, uncond = logits.float().chunk(2)
        return uncond + self.guidance * (cond - uncond)

    def _rows(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens, tokens]) if self.doubled else tokens

    def start(self) -> torch.Tensor:
        """Logits of s_1."""
        if self.cache is None:
            s, _ = self.prior.prefix_logits(self.labels, self.structure[:, :0], self.appearance_in[:, :0])
        else:
            s = self.prior.start(self.cache, self.labels)
        return self._guide(s)

    def step(self, i: int, structure_i: torch.Tensor, appearance_prev: torch.Tensor):
        """Feed s_i and a_{i-1} (start token at i = 1); logits of s_{i+1} and a_i."""
        s_in, a_in = self._rows(structure_i), self._rows(appearance_prev)
        if self.cache is None:
            self.structure[:, i - 1], self.appearance_in[:, i - 1] = s_in, a_in
            s, a = self.prior.prefix_logits(self.labels, self.structure[:, :i], self.appearance_in[:, :i])
        else:
            s, a = self.prior.step(self.cache, i, s_in, a_in)
        return self._guide(s), self._guide(a)


def _decode_chunk(decoder: GuidedDecoder, batch: int, cfg: SamplingConfig, generator: torch.Generator,
                  structure: torch.Tensor | None, on_step: Callable[[], None]):
    prior = decoder.prior
    n, device = prior.num_locations, decoder.labels.device
    S = torch.empty(batch, n, dtype=torch.long, device=device)
    A = torch.empty(batch, n, dtype=torch.long, device=device)
    s_logits = decoder.start()
    on_step()
    a_prev = torch.full((batch,), prior.appearance_start, dtype=torch.long, device=device)
    for i in range(1, n + 1):
        S[:, i - 1] = structure[:, i - 1] if structure is not None else sample_from_logits(s_logits, cfg, generator)
        s_logits, a_logits = decoder.step(i, S[:, i - 1], a_prev)
        a_prev = A[:, i - 1] = sample_from_logits(a_logits, cfg, generator)
        on_step()
    return S, A


def _setting_groups(labels: torch.Tensor, cfg: SamplingConfig) -> list[tuple[SamplingConfig, torch.Tensor]]:
    """Rows sampled with one setting, in order of first appearance: a single group of all rows
    unless some label has its own setting (``SamplingConfig.by_label``)."""
    if not cfg.by_label:
        return [(cfg, torch.arange(len(labels)))]
    rows: dict[tuple, list[int]] = {}
    settings: dict[tuple, SamplingConfig] = {}
    for row, label in enumerate(labels.tolist()):
        setting = cfg.for_label(label)
        key = (setting.guidance, setting.temperature, setting.top_k, setting.top_p)
        rows.setdefault(key, []).append(row)
        settings[key] = setting
    return [(settings[key], torch.tensor(r, dtype=torch.long)) for key, r in rows.items()]


def _sample(prior: InterleavedPrior, labels, cfg: SamplingConfig, device, structure, progress, use_cache: bool):
    device = torch.device(device)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) <= prior.null_label):
        raise ValueError(f"labels must lie in [0, {prior.num_labels}] ({prior.num_labels} = null label)")
    if structure is not None:
        structure = torch.as_tensor(structure, dtype=torch.long).reshape(len(labels), -1)
        if structure.shape[1] != prior.num_locations:
            raise ValueError(f"structure has {structure.shape[1]} locations, the prior's grid has {prior.num_locations}")
        if structure.numel() and not (0 <= int(structure.min()) and int(structure.max()) < prior.num_structure_codes):
            raise ValueError(f"structure tokens must lie in [0, {prior.num_structure_codes})")

    n, total = prior.num_locations, len(labels)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    reporting = contextlib.ExitStack()
    task = reporting.enter_context(progress.task("sampling", total=total)) if progress is not None else None
    was_training = prior.training
    prior.to(device).eval()
    S_all = torch.empty(total, n, dtype=torch.long)
    A_all = torch.empty(total, n, dtype=torch.long)
    done = 0
    try:
        with torch.inference_mode(), autocast(device):
            for setting, rows in _setting_groups(labels, cfg):
                for begin in range(0, len(rows), cfg.batch_size):
                    index = rows[begin:begin + cfg.batch_size]
                    chunk = labels[index].to(device)
                    given = structure[index].to(device) if structure is not None else None
                    decoder = GuidedDecoder(prior, chunk, setting.guidance, use_cache, cfg.compile)
                    advance = len(chunk) / (n + 1)

                    def on_step() -> None:
                        if task is not None:
                            task.advance(advance)

                    S, A = _decode_chunk(decoder, len(chunk), setting, generator, given, on_step)
                    S_all[index], A_all[index] = S.cpu(), A.cpu()
                    del decoder  # free this chunk's cache before the next one is allocated
                    done += len(chunk)
                    if task is not None:
                        task.update(completed=done)
    finally:
        prior.train(was_training)
        reporting.close()
    h, w = prior.grid
    return S_all.view(-1, h, w), A_all.view(-1, h, w)


def sample_tokens(
    prior: InterleavedPrior,
    labels: torch.Tensor | Sequence[int],
    cfg: SamplingConfig,
    device: torch.device | str,
    structure: torch.Tensor | None = None,
    progress: Reporter | None = None,
    use_cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (S, A) token grids, each (B, h, w) long on the CPU, one per label.

    ``structure`` (B, h, w): teacher-force these structure tokens and sample only appearance
    (mask-conditioned rendering); the returned S is then exactly ``structure``. Labels are
    processed in chunks of ``cfg.batch_size`` images (one KV cache per chunk bounds memory); one
    generator seeded with ``cfg.seed`` runs through the chunks in order. Labels with their own
    setting (``cfg.by_label``) are chunked apart from the rest, each setting's rows in order of
    first appearance; the result keeps the order of ``labels``. ``progress``: a
    ``reporter.Reporter`` to report on, or None. ``use_cache=False`` recomputes the whole prefix
    at every step (O(N^2) tokens; ``sample_tokens_nocache``).
    """
    return _sample(prior, labels, cfg, device, structure, progress, use_cache=use_cache)


# the reference the cached sampler is tested against: same arguments, whole prefix every step
sample_tokens_nocache = functools.partial(sample_tokens, use_cache=False)
