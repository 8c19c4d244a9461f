"""Train the interleaved prior on a token cache written by the tokenizer stage.

Outputs in ``out_dir``: prior.pt (checkpoint, also the resume point), prior_config.json,
prior_loss.csv (step, structure_nll, appearance_nll, lr) and, with a held-out cache,
prior_heldout_nll.json (mean per-token NLL of each stream on the held-out tokens) and, with
``eval_every``, the learning curve prior_heldout_curve.csv (held-out NLL against steps and minutes).
With that curve and ``keep_best``, prior.pt also holds the weights of the curve's lowest point
(``best``): what ``load_prior`` samples with and what prior_heldout_nll.json measures, while the
last step's weights stay the resume point.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .config import from_dict, save_json, to_dict
from .device import autocast, compile_modules, resolve_device, to_device
from .prior import ARCHITECTURE_FIELDS, InterleavedPrior, PriorConfig
from .reporter import Reporter, reporter_for
from .training import LossCSV, label_balanced_weights, load_checkpoint, make_adamw, save_checkpoint, selected_weights

CHECKPOINT_NAME = "prior.pt"
LOSS_CSV_NAME = "prior_loss.csv"
HELDOUT_NAME = "prior_heldout_nll.json"
CURVE_CSV_NAME = "prior_heldout_curve.csv"
CACHE_KEYS = ("structure", "appearance", "labels", "label_names", "num_structure_codes", "num_appearance_codes")


def load_token_cache(path: str | Path) -> dict[str, Any]:
    """Load and check a token cache: structure/appearance (M, h, w) long, labels (M,) long,
    label_names list[str], num_structure_codes / num_appearance_codes int."""
    cache = torch.load(Path(path), map_location="cpu", weights_only=True)
    missing = [k for k in CACHE_KEYS if k not in cache]
    if missing:
        raise ValueError(f"token cache {path} lacks {', '.join(missing)}")
    S, A, y = cache["structure"], cache["appearance"], cache["labels"]
    if S.ndim != 3 or S.shape != A.shape or y.shape != (S.shape[0],):
        raise ValueError(f"token cache {path}: structure {tuple(S.shape)}, appearance {tuple(A.shape)}, "
                         f"labels {tuple(y.shape)} do not fit (M, h, w), (M, h, w), (M,)")
    for name, tensor, bound in (
        ("structure", S, cache["num_structure_codes"]),
        ("appearance", A, cache["num_appearance_codes"]),
        ("labels", y, len(cache["label_names"])),
    ):
        if tensor.dtype != torch.long:
            raise ValueError(f"token cache {path}: {name} must be int64, got {tensor.dtype}")
        if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= bound):
            raise ValueError(f"token cache {path}: {name} values outside [0, {bound})")
    return cache


def total_steps(cfg: PriorConfig, dataset_size: int) -> int:
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * dataset_size / cfg.batch_size))
    return cfg.steps


def learning_rate(step: int, cfg: PriorConfig, total: int) -> float:
    """Linear warmup over warmup_steps, then cosine decay to min_lr_ratio * lr (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if not cfg.cosine:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate_nll(prior: InterleavedPrior, cache: dict[str, Any], device: torch.device, batch_size: int) -> dict[str, float]:
    """Mean per-token NLL (nats) of each stream over a whole token cache."""
    was_training = prior.training
    prior.eval()
    S, A, y = cache["structure"], cache["appearance"], cache["labels"]
    sums, count = torch.zeros(2, dtype=torch.float64), 0
    for begin in range(0, len(y), batch_size):
        sl = slice(begin, begin + batch_size)
        with autocast(device):
            s_nll, a_nll = prior.loss(S[sl].to(device), A[sl].to(device), y[sl].to(device))
        n = len(y[sl])
        sums += torch.tensor([s_nll.item(), a_nll.item()], dtype=torch.float64) * n
        count += n
    prior.train(was_training)
    s, a = (sums / max(count, 1)).tolist()
    return {"structure_nll": s, "appearance_nll": a, "total_nll": s + a, "num_samples": count}


def _spread_subset(cache: dict[str, Any], n: int) -> dict[str, Any]:
    """At most n sequences of a token cache, evenly spaced (so every label keeps its share)."""
    count = len(cache["labels"])
    if count <= n:
        return cache
    idx = torch.linspace(0, count - 1, n).long()
    return {**cache, "structure": cache["structure"][idx], "appearance": cache["appearance"][idx],
            "labels": cache["labels"][idx]}


def _check_resumable(saved: dict[str, Any], cfg: PriorConfig, vocab: dict[str, Any]) -> None:
    for field in ARCHITECTURE_FIELDS:
        if saved["config"][field] != getattr(cfg, field):
            raise ValueError(f"cannot resume: checkpoint has {field}={saved['config'][field]}, "
                             f"the config asks for {getattr(cfg, field)}")
    for key, value in vocab.items():
        if saved[key] != value:
            raise ValueError(f"cannot resume: checkpoint has {key}={saved[key]}, the token cache {value}")


def train_prior(
    tokens_path: str | Path,
    out_dir: str | Path,
    cfg: PriorConfig,
    device: torch.device | str = "auto",
    resume: bool = False,
    heldout_tokens_path: str | Path | None = None,
    progress: bool = True,
    reporter: Reporter | None = None,
    compile: bool = False,
    init_from: str | Path | None = None,
) -> Path:
    """Train (or resume training) the prior; returns the path of the final checkpoint.

    Under torchrun every rank calls this (``distributed``): each trains on its block of the global
    batch with DistributedDataParallel; rank 0 alone writes the logs, the held-out figures and the
    checkpoints. ``compile``: torch.compile every transformer block (CUDA).
    ``init_from``: a new run starts from that finished run's prior (``init_from.load_prior_weights``).
    """
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT_NAME

    data = load_token_cache(tokens_path)
    S = data["structure"].flatten(1)  # raster order: location i = row * w + col
    A = data["appearance"].flatten(1)
    y = data["labels"]
    grid = tuple(data["structure"].shape[1:])
    vocab = {
        "num_structure_codes": int(data["num_structure_codes"]),
        "num_appearance_codes": int(data["num_appearance_codes"]),
        "grid": list(grid),
        "label_names": list(data["label_names"]),
    }

    torch.manual_seed(cfg.seed)  # weight init and label / residual dropout draws
    prior = InterleavedPrior(cfg, vocab["num_structure_codes"], vocab["num_appearance_codes"], grid,
                             len(vocab["label_names"])).to(device)
    optimizer = make_adamw(prior, cfg.lr, cfg.betas, cfg.weight_decay)
    batch_rng = torch.Generator().manual_seed(cfg.seed)
    weights = label_balanced_weights(y) if cfg.balance_labels else torch.ones(len(y))
    heldout = load_token_cache(heldout_tokens_path) if heldout_tokens_path is not None else None
    if heldout is not None and tuple(heldout["structure"].shape[1:]) != grid:
        raise ValueError(f"held-out grid {tuple(heldout['structure'].shape[1:])} != training grid {grid}")

    step, elapsed = 0, 0.0
    best: dict[str, Any] | None = None  # {"step", "heldout_nll", "model"} of the curve's lowest point
    total = total_steps(cfg, len(y))
    if resume and ckpt_path.exists():
        saved = load_checkpoint(ckpt_path, map_location=device)
        _check_resumable(saved, cfg, vocab)
        if int(saved["step"]) >= total and (heldout is None or (out_dir / HELDOUT_NAME).is_file()):
            return ckpt_path  # finished, its held-out figure written: nothing to train or rewrite
        if "optimizer" not in saved:  # a weights-only checkpoint (shipped, or slimmed after training)
            raise ValueError(f"{ckpt_path} holds weights only, no optimiser state: its remaining prior steps "
                             "cannot be resumed; start a new run (--init can start from it)")
        prior.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        batch_rng.set_state(saved["batch_rng"].cpu())
        torch.set_rng_state(saved["torch_rng"].cpu())
        step = int(saved["step"])
        elapsed = float(saved.get("elapsed_s", 0.0))
        best = saved.get("best")
    elif init_from is not None:  # a new run started from another's prior, labels matched by name
        from pathar_aug.init_from import load_prior_weights

        load_prior_weights(prior, init_from, vocab["label_names"])
    main, rows = distributed.is_main(), distributed.rank_block(cfg.batch_size)
    if not main:  # label dropout draws from this rank's own stream
        torch.manual_seed(distributed.rank_seed(cfg.seed + step))
    if compile:
        compile_modules(*prior.blocks)
    trainer = distributed.wrap(_Loss(prior), device)
    reporter, progress = distributed.reporter_of(reporter, progress)

    if main:
        save_json(to_dict(cfg) | {"total_steps": total, **vocab}, out_dir / "prior_config.json")
    log = LossCSV(out_dir / LOSS_CSV_NAME, ["structure_nll", "appearance_nll", "lr"], resume_step=step) if main else None
    curve = LossCSV(out_dir / CURVE_CSV_NAME, ["heldout_structure_nll", "heldout_appearance_nll", "minutes"],
                    resume_step=step) if heldout is not None and cfg.eval_every and main else None
    # the curve's points see the same held-out sequences each time (a fixed, label-spread subset)
    curve_cache = _spread_subset(heldout, cfg.eval_sequences) if curve is not None else None
    started = time.monotonic() - elapsed

    def checkpoint() -> None:
        if not main:
            return
        save_checkpoint(
            ckpt_path, model=prior.state_dict(), optimizer=optimizer.state_dict(), step=step,
            config=to_dict(cfg), batch_rng=batch_rng.get_state(), torch_rng=torch.get_rng_state(),
            elapsed_s=time.monotonic() - started, **vocab, **({"best": best} if best else {}),
        )

    prior.train()
    running = torch.zeros(2, device=device)  # summed on the device: no wait for the GPU every step
    running_steps = 0
    with reporter_for(reporter, progress=progress).task("prior", total=total, completed=step) as task:
        while step < total:
            lr = learning_rate(step, cfg, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=batch_rng)
            idx = idx[rows]  # this rank's block of the global batch
            with autocast(device):
                s_nll, a_nll = trainer(to_device(S[idx], device), to_device(A[idx], device), to_device(y[idx], device))
            optimizer.zero_grad(set_to_none=True)
            (s_nll + a_nll).backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(prior.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1

            running += torch.stack([s_nll.detach(), a_nll.detach()]).float()
            running_steps += 1
            if step % cfg.log_every == 0 or step == total:
                s_avg, a_avg = distributed.all_mean(running / running_steps).tolist()  # over the global batch
                if log is not None:
                    log.log(step, {"structure_nll": s_avg, "appearance_nll": a_avg, "lr": lr})
                task.update(info=f"s {s_avg:.3f}  a {a_avg:.3f}  lr {lr:.2e}")
                running.zero_()
                running_steps = 0
            if curve is not None and (step % cfg.eval_every == 0 or step == total):
                point = evaluate_nll(prior, curve_cache, device, cfg.eval_batch_size)
                curve.log(step, {"heldout_structure_nll": point["structure_nll"],
                                 "heldout_appearance_nll": point["appearance_nll"],
                                 "minutes": (time.monotonic() - started) / 60})
                if cfg.keep_best and (best is None or point["total_nll"] < best["heldout_nll"]):
                    best = {"step": step, "heldout_nll": point["total_nll"],
                            "model": {k: v.detach().clone() for k, v in prior.state_dict().items()}}
            if step % cfg.ckpt_every == 0 and step < total:
                checkpoint()
            task.update(completed=step)
    checkpoint()

    if heldout is not None and main:
        if best is not None:  # the figure of the weights the run samples with
            prior.load_state_dict(best["model"])
        result = evaluate_nll(prior, heldout, device, cfg.eval_batch_size)
        save_json(result | {"step": best["step"] if best else step, "last_step": step,
                            "tokens": str(heldout_tokens_path)}, out_dir / HELDOUT_NAME)
    return ckpt_path


class _Loss(torch.nn.Module):
    """The prior's training loss as a forward pass: what DistributedDataParallel wraps."""

    def __init__(self, prior: InterleavedPrior):
        super().__init__()
        self.prior = prior

    def forward(self, structure: torch.Tensor, appearance: torch.Tensor, labels: torch.Tensor):
        return self.prior.loss(structure, appearance, labels)


def load_prior(checkpoint_path: str | Path, device: torch.device | str = "auto") -> InterleavedPrior:
    """Rebuild a trained prior from its checkpoint, in eval mode on ``device``: the weights of the
    held-out curve's lowest point when training kept them, else the last step's."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    saved = load_checkpoint(checkpoint_path, map_location=device)
    cfg = from_dict(PriorConfig, saved["config"])
    prior = InterleavedPrior(cfg, saved["num_structure_codes"], saved["num_appearance_codes"],
                             tuple(saved["grid"]), len(saved["label_names"]))
    prior.load_state_dict(selected_weights(saved))
    prior.label_names = list(saved["label_names"])
    return prior.to(device).eval()
