"""Tokenizer stage: train the Dual-VQ tokenizer on patches, with checkpoints, loss CSV and previews."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from pathar_aug import distributed
from pathar_aug.adversarial_decoder import LOSS_TERMS as GAN_TERMS
from pathar_aug.adversarial_decoder import AdversarialDecoderTrainer, judged_label_ids
from pathar_aug.config import from_dict, to_dict
from pathar_aug.device import autocast, compile_modules, to_device
from pathar_aug.patches import PatchSet, dihedral, random_dihedral
from pathar_aug.preview import save_grid, to_rgb_tiles
from pathar_aug.quantizer import codebook_usage
from pathar_aug.reporter import Reporter, reporter_for
from pathar_aug.tokenizer import DualVQTokenizer, TokenizerConfig
from pathar_aug.training import (
    LossCSV,
    label_balanced_weights,
    load_checkpoint,
    make_adamw,
    save_checkpoint,
)

CHECKPOINT = "tokenizer.pt"
INIT_FIT = "init_fit.json"  # with --init-tokenizer auto: how the starting tokenizer fit and what was decided
LOSS_TERMS = ("loss", "rec", "vq_structure", "vq_appearance", "seg")


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def save_preview(model: DualVQTokenizer, patches: PatchSet, path: Path, device: torch.device, n: int = 8) -> Path:
    """Columns: image, reconstruction, mask, mask decoded from structure tokens alone."""
    was_training = model.training
    model.eval()
    idx = torch.linspace(0, len(patches) - 1, min(n, len(patches))).long()
    images, masks = patches.images[idx].to(device), patches.masks[idx].to(device)
    s, a = model.encode(images, masks)
    recon, pred = model.decode(s, a)
    model.train(was_training)
    k = model.cfg.num_classes
    cols = [to_rgb_tiles(images), to_rgb_tiles(recon), to_rgb_tiles(masks, k), to_rgb_tiles(pred, k)]
    return save_grid([list(row) for row in zip(*cols)], path)


def train_tokenizer(
    patches: PatchSet,
    out_dir: str | Path,
    cfg: TokenizerConfig,
    device: torch.device,
    resume: bool = False,
    show_progress: bool = True,
    seed: int = 0,
    reporter: Reporter | None = None,
    compile: bool = False,
    init_from: str | Path | None = None,
    init_mode: str = "finetune",
) -> Path:
    """Train (or resume) the tokenizer; returns the checkpoint path. A finished run returns at once.

    ``init_from``: a new run starts from that run's tokenizer, fine-tuned for the configured steps
    (``init_mode`` "finetune"), kept as it is ("freeze": no step trained) or, "auto", frozen when it
    reconstructs these patches within the fit limits (``init_from.tokenizer_fit``; its figures and
    the decision go to ``init_fit.json`` and the log), fine-tuned otherwise.

    Under torchrun every rank calls this (``distributed``): each trains on its block of the global
    batch with DistributedDataParallel, rank 0 alone writes the log, previews and checkpoints.
    ``compile``: torch.compile the encoders and decoders (CUDA)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT
    if patches.images.shape[-1] != cfg.patch_size:
        raise ValueError(f"patches are {patches.images.shape[-1]} px but the tokenizer expects {cfg.patch_size} px")
    judged_label_ids(cfg, patches.label_names)  # an unknown name fails now, not after the tokenizer's steps
    torch.manual_seed(seed)
    model = DualVQTokenizer(cfg).to(device)
    opt = make_adamw(model, cfg.lr, cfg.betas, cfg.weight_decay)
    step, elapsed, fit, adversarial_state, optimiser_kept = 0, 0.0, None, None, True
    if ckpt_path.exists():
        if not resume:
            raise FileExistsError(f"{ckpt_path} exists; resume it or choose another output folder")
        state = load_checkpoint(ckpt_path, device)
        model.load_state_dict(state["model"])
        step = state["step"]
        optimiser_kept = "optimizer" in state
        if optimiser_kept:
            opt.load_state_dict(state["optimizer"])
        elif step < cfg.steps:  # a weights-only checkpoint (shipped, or slimmed after training)
            raise ValueError(f"{ckpt_path} holds weights only, no optimiser state: its {cfg.steps - step} "
                             "remaining tokenizer steps cannot be resumed; start a new run (--init can start from it)")
        elapsed = float(state.get("elapsed_s", 0.0))
        adversarial_state = state.get("adversarial")
    elif init_from is not None:  # a new run started from another's weights: fine-tuned, or frozen as they are
        from pathar_aug.init_from import load_tokenizer_weights, tokenizer_fit

        load_tokenizer_weights(model, init_from)
        if init_mode == "auto":  # every rank decides alike: the same patches, the same weights
            fit = tokenizer_fit(model, patches, device)
            init_mode = fit["mode"]
        if init_mode == "freeze":
            step = cfg.steps
    main, rows = distributed.is_main(), distributed.rank_block(cfg.batch_size)
    if not main:  # appearance shuffling draws from this rank's own stream
        torch.manual_seed(distributed.rank_seed(seed + step))
    if compile:
        compile_modules(model.structure_encoder, model.appearance_encoder, model.mask_in, model.fusion,
                        model.mask_decoder, model.image_decoder)
    trainer = distributed.wrap(model, device)
    reporter, show_progress = distributed.reporter_of(reporter, show_progress)
    if fit is not None and main:
        from pathar_aug.init_from import describe_fit

        (out_dir / INIT_FIT).write_text(json.dumps(fit, indent=1))
        reporter_for(reporter).log(describe_fit(fit))
    log = LossCSV(out_dir / "tokenizer_loss.csv",
                  [*LOSS_TERMS, "usage_structure", "usage_appearance", "lr", "minutes"], step) if main else None
    started = time.monotonic() - elapsed  # training time across resumed invocations

    adversarial = None  # the decoder's adversarial stage, once it begins

    def checkpoint() -> None:
        if not main:
            return
        extra = {"adversarial": adversarial.state_dict()} if adversarial is not None else {}
        if optimiser_kept:  # a weights-only checkpoint stays one: its own steps are done
            extra["optimizer"] = opt.state_dict()
        save_checkpoint(ckpt_path, model=model.state_dict(), step=step,
                        config=to_dict(cfg), label_names=patches.label_names, elapsed_s=time.monotonic() - started,
                        **extra)

    gen = torch.Generator().manual_seed(seed + step)
    weights = label_balanced_weights(patches.labels)

    def batch(size: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's ``rows`` of a label-balanced global batch of ``size``, each patch in a random
        dihedral view."""
        idx = torch.multinomial(weights, size, replacement=True, generator=gen)
        images, masks = random_dihedral(patches.images[idx], patches.masks[idx], gen)
        return to_device(images[rows], device), to_device(masks[rows], device), patches.labels[idx][rows]

    def step_done(task, last: int, completed: int) -> None:
        """A step's end in either stage: preview and checkpoint when due (``last``: the stage's
        final step), progress."""
        if main and (step % cfg.preview_every == 0 or step == last):
            save_preview(model, patches, out_dir / "tokenizer_preview.png", device)
        if step % cfg.ckpt_every == 0 or step == last:
            checkpoint()
        task.update(completed=completed)

    model.train()
    window_s, window_a = [], []
    with reporter_for(reporter, progress=show_progress).task("tokenizer", total=cfg.steps,
                                                            completed=min(step, cfg.steps)) as task:
        while step < cfg.steps:
            images, masks, labels = batch(cfg.batch_size, rows)
            lr = lr_at(step, cfg.steps, cfg.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast(device):
                out = trainer(images, masks, labels)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            window_s.append(out["structure_tokens"].detach().flatten())
            window_a.append(out["appearance_tokens"].detach().flatten())
            if step % cfg.log_every == 0 or step == cfg.steps:
                usage_s = _usage(torch.cat(window_s), cfg.structure_codes)
                usage_a = _usage(torch.cat(window_a), cfg.appearance_codes)
                window_s, window_a = [], []
                # the global batch's losses: the mean of the ranks' block means
                terms = distributed.all_mean(torch.stack([out[k].detach().float() for k in LOSS_TERMS]))
                values = dict(zip(LOSS_TERMS, terms.tolist()))
                if log is not None:
                    log.log(step, {**values, "usage_structure": usage_s, "usage_appearance": usage_a, "lr": lr,
                                   "minutes": (time.monotonic() - started) / 60})
                task.update(info=f"loss {values['loss']:.3f} rec {values['rec']:.3f} seg {values['seg']:.3f} "
                                      f"usage S {usage_s:.0%} A {usage_a:.0%}")
            step_done(task, cfg.steps, step)
    if step < cfg.total_steps:
        adversarial = AdversarialDecoderTrainer(model, cfg, device, patches.label_names)
        gan_rows = distributed.rank_block(cfg.adversarial_batch_size)
        if adversarial_state is not None:
            adversarial.load_state_dict(adversarial_state)
        gan_log = LossCSV(out_dir / "tokenizer_adversarial_loss.csv", [*GAN_TERMS, "minutes"],
                          step) if main else None
        with reporter_for(reporter, progress=show_progress).task(
                "image decoder, adversarial", total=cfg.adversarial_steps, completed=step - cfg.steps) as task:
            while step < cfg.total_steps:
                images, masks, labels = batch(cfg.adversarial_batch_size, gan_rows)
                terms = adversarial.step(images, masks, labels, lambda: autocast(device))
                step += 1
                if step % cfg.log_every == 0 or step == cfg.total_steps:
                    values = dict(zip(GAN_TERMS, distributed.all_mean(torch.stack(
                        [terms[k].float() for k in GAN_TERMS])).tolist()))
                    if gan_log is not None:
                        gan_log.log(step, {**values, "minutes": (time.monotonic() - started) / 60})
                    task.update(info=f"rec {values['rec']:.3f} D {values['discriminator']:.2f} "
                                     f"weight {values['adaptive_weight']:.2f}")
                step_done(task, cfg.total_steps, step - cfg.steps)
    if not ckpt_path.exists():  # resumed a finished run with nothing to do
        checkpoint()
    return ckpt_path


def _usage(tokens: torch.Tensor, num_codes: int) -> float:
    """``codebook_usage`` of the tokens of every rank."""
    if not distributed.active():
        return codebook_usage(tokens, num_codes)
    hit = torch.zeros(num_codes, dtype=torch.uint8, device=tokens.device)
    hit[tokens] = 1
    return int(distributed.all_max(hit).sum()) / num_codes


def load_tokenizer(path: str | Path, device: torch.device | str = "cpu") -> DualVQTokenizer:
    """Load a trained tokenizer in eval mode."""
    state = load_checkpoint(path, device)
    model = DualVQTokenizer(from_dict(TokenizerConfig, state["config"])).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


@torch.no_grad()
def build_token_cache(
    model: DualVQTokenizer, patches: PatchSet, path: str | Path, device: torch.device,
    dihedral_views: bool = True, batch_size: int = 64,
) -> Path:
    """Encode every patch once (x 8 dihedral views for training) into the prior's token cache."""
    model.eval()
    views = range(8) if dihedral_views else range(1)
    s_all, a_all, labels = [], [], []
    for k in views:
        for start in range(0, len(patches), batch_size):
            images = dihedral(patches.images[start:start + batch_size], k).to(device)
            masks = dihedral(patches.masks[start:start + batch_size], k).to(device)
            s, a = model.encode(images, masks)
            s_all.append(s.cpu())
            a_all.append(a.cpu())
            labels.append(patches.labels[start:start + batch_size])
    cache = {
        "structure": torch.cat(s_all).long(), "appearance": torch.cat(a_all).long(), "labels": torch.cat(labels),
        "label_names": patches.label_names, "num_structure_codes": model.cfg.structure_codes,
        "num_appearance_codes": model.cfg.appearance_codes,
    }
    path = Path(path)
    save_checkpoint(path, **cache)
    return path
