"""Checks of what a user hands in besides the data files: option values and output folders.

Data files (images, masks, label CSVs) are checked where they are read, in ``ingest``. The checks
here run before anything is written; each failure raises ``ArgumentError`` with one line that
names the option or path and says what to do.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pipeline imports this module
    from pathar_aug.pipeline import RunSettings

MAX_SEED = 2**32 - 1  # seeds are mixed into larger seeds (seed * 1_000_003 + chunk); keep them in int64


class ArgumentError(ValueError):
    """An option value or output path that cannot work; the message says which and why."""


def check_int(option: str, value: int, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ArgumentError(f"{option} must be a whole number {bound}, got {value!r}")
    return value


def check_float(option: str, value: float, minimum: float | None = None, below: float | None = None) -> float:
    """A finite number, at least ``minimum`` and below ``below`` where given (NaN never passes)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (below is None or value < below)
    if not ok:
        parts = [f">= {minimum}" if minimum is not None else "", f"< {below}" if below is not None else ""]
        bound = " and ".join(p for p in parts if p)
        raise ArgumentError(f"{option} must be a finite number{' ' + bound if bound else ''}, got {value!r}")
    return float(value)


def check_seed(value: int, option: str = "--seed") -> int:
    return check_int(option, value, 0, MAX_SEED)


def check_out_folder(path: str | Path, option: str = "--out") -> Path:
    """A folder that exists or can be made: not a file, not below a file, and writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"{path}: {option} names an existing file; choose a folder")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ArgumentError(f"{path}: {option} lies below {parent}, which is a file; choose a folder")
            break
    existing = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArgumentError(f"{path}: no permission to write in {existing}; choose another {option}")
    return path


def check_run_settings(settings: "RunSettings") -> None:
    """Training settings that would fail mid-run, or silently train nothing."""
    tok, prior = settings.tokenizer, settings.prior
    check_int("--tokenizer-steps", tok.steps)
    check_int("--adversarial-steps", tok.adversarial_steps, 0)
    check_int("adversarial batch size", tok.adversarial_batch_size)
    check_int("--batch-size (tokenizer)", tok.batch_size)
    check_int("--batch-size (prior)", prior.batch_size)
    if prior.epochs is None:
        check_int("--prior-steps", prior.steps)
    else:
        check_float("prior epochs", prior.epochs, minimum=1e-9)
    check_float("--val-fraction", settings.val_fraction, minimum=0.0, below=1.0)
    check_seed(settings.seed)


def check_sampling(guidance: float, temperature: float, top_k: int, top_p: float, batch_size: int,
                   seed: int) -> None:
    """Sampling options; NaN or infinite values would only fail inside the sampler, after writes."""
    check_float("--cfg", guidance, minimum=0.0)
    check_float("--temperature", temperature)
    check_int("--top-k", top_k, 0)
    check_float("--top-p", top_p, minimum=0.0)
    check_int("--batch-size", batch_size)
    check_seed(seed)
