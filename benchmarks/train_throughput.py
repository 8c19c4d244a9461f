"""Training throughput of the tokenizer and the prior, through the real training loops.

    python benchmarks/train_throughput.py [--device cuda] [--preset paper] [--steps 60 300] [--compile]
                                          [--out benchmarks/results/train_throughput.json]

Random patches (disc masks, tinted images) and a random token cache stand in for data: the speed
of a step does not depend on what is learnt. ``train_tokenizer`` and ``train_prior`` run as
``pathar-aug train`` runs them (bf16 autocast and TF32 on CUDA, pinned-memory batches, optionally
``--compile``) into a scratch folder; a reporter notes the time of every logged step, where the loop
waits for the device anyway (it reads the losses), and the steady rate is taken between the first
logged step after the warm-up and the last one. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from pathar_aug.config import from_preset, save_json, to_dict
from pathar_aug.device import resolve_device
from pathar_aug.patches import PatchSet
from pathar_aug.prior import PRIOR_PRESETS
from pathar_aug.reporter import Reporter, Task
from pathar_aug.tokenizer import TOKENIZER_PRESETS
from pathar_aug.train_prior import train_prior
from pathar_aug.train_tokenizer import train_tokenizer
from pathar_aug.training import save_checkpoint

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"


class _Clock(Task):
    def __init__(self, marks: dict[int, float]):
        self.marks = marks

    def update(self, completed=None, info=None) -> None:
        if info is not None:  # a logged step: the loop has just read its losses from the device
            self.marks[self.step] = time.perf_counter()
        if completed is not None:
            self.step = int(completed)


class ClockReporter(Reporter):
    """Records the time of every logged step of a training loop."""

    def __init__(self):
        super().__init__(lambda text: None)
        self.marks: dict[int, float] = {}

    @contextlib.contextmanager
    def task(self, description, total=None, completed=0):
        clock = _Clock(self.marks)
        clock.step = int(completed)
        yield clock


def random_patches(n: int, size: int, labels: int = 3) -> PatchSet:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    for i in range(n):
        for _ in range(6):
            cy, cx = torch.randint(8, size - 8, (2,), generator=g).tolist()
            r = int(torch.randint(4, max(5, size // 10), (1,), generator=g))
            masks[i, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    tint = torch.randint(60, 255, (n, 3, 1, 1), generator=g)
    noise = torch.randint(0, 40, (n, 3, size, size), generator=g)
    images = (tint * masks + noise).clamp(0, 255).to(torch.uint8)
    return PatchSet(images, masks, torch.arange(n) % labels, [f"l{i}" for i in range(labels)],
                    [f"s{i}" for i in range(n)])


def random_tokens(path: Path, n: int, grid: tuple[int, int], codes_s: int, codes_a: int, labels: int = 3) -> Path:
    g = torch.Generator().manual_seed(1)
    save_checkpoint(path, structure=torch.randint(0, codes_s, (n, *grid), generator=g),
                    appearance=torch.randint(0, codes_a, (n, *grid), generator=g),
                    labels=torch.arange(n) % labels, label_names=[f"l{i}" for i in range(labels)],
                    num_structure_codes=codes_s, num_appearance_codes=codes_a)
    return path


def rate(marks: dict[int, float], warmup: int) -> dict:
    steps = sorted(s for s in marks if s > warmup) or sorted(marks)
    first, last = steps[0], steps[-1]
    seconds = marks[last] - marks[first]
    per_step = seconds / (last - first) if last > first else float("nan")
    return {"timed_steps": last - first, "seconds_per_step": round(per_step, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--preset", default="paper", choices=sorted(TOKENIZER_PRESETS))
    parser.add_argument("--steps", nargs=2, type=int, default=[60, 300], metavar=("TOKENIZER", "PRIOR"))
    parser.add_argument("--log-every", type=int, default=10, help="logged (and timed) every this many steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks, as train --compile")
    parser.add_argument("--stages", nargs="+", default=["tokenizer", "prior"], choices=["tokenizer", "prior"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    tcfg = from_preset(TOKENIZER_PRESETS, args.preset, steps=args.steps[0], log_every=args.log_every,
                       ckpt_every=10**9, preview_every=10**9)
    pcfg = dataclasses.replace(  # steps, not the preset's epochs
        from_preset(PRIOR_PRESETS, args.preset, steps=args.steps[1], log_every=args.log_every, ckpt_every=10**9,
                    eval_every=0, warmup_steps=0), epochs=None)
    grid = (tcfg.patch_size // tcfg.downsample,) * 2
    warmup = 2 * args.log_every  # first steps: allocator, cuDNN autotuning, compilation
    report: dict = {"device": str(device), "preset": args.preset, "compile": args.compile,
                    "precision": "bf16 autocast + TF32" if device.type == "cuda" else "float32",
                    "torch": torch.__version__, "python": platform.python_version(),
                    "warmup_steps_not_timed": warmup}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if "tokenizer" in args.stages:
            clock = ClockReporter()
            patches = random_patches(4 * tcfg.batch_size, tcfg.patch_size)
            t0 = time.perf_counter()
            train_tokenizer(patches, scratch / "tokenizer", tcfg, device, reporter=clock, compile=args.compile)
            result = rate(clock.marks, warmup) | {"batch": tcfg.batch_size, "steps": tcfg.steps,
                                                  "wall_seconds": round(time.perf_counter() - t0, 1)}
            result["images_per_s"] = round(tcfg.batch_size / result["seconds_per_step"], 2)
            if device.type == "cuda":
                result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                torch.cuda.reset_peak_memory_stats(device)
            report["tokenizer"] = {"config": {k: to_dict(tcfg)[k] for k in ("patch_size", "downsample", "channels",
                                                                           "res_blocks", "structure_codes")},
                                   **result}
            print("tokenizer", json.dumps(result), flush=True)
        if "prior" in args.stages:
            clock = ClockReporter()
            tokens = random_tokens(scratch / "tokens.pt", 8 * pcfg.batch_size, grid, tcfg.structure_codes,
                                   tcfg.appearance_codes)
            t0 = time.perf_counter()
            train_prior(tokens, scratch / "prior", pcfg, device, reporter=clock, compile=args.compile)
            result = rate(clock.marks, warmup) | {"batch": pcfg.batch_size, "steps": pcfg.steps,
                                                  "wall_seconds": round(time.perf_counter() - t0, 1)}
            result["sequences_per_s"] = round(pcfg.batch_size / result["seconds_per_step"], 2)
            result["tokens_per_s"] = round(result["sequences_per_s"] * 2 * grid[0] * grid[1], 1)
            if device.type == "cuda":
                result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            report["prior"] = {"config": {k: to_dict(pcfg)[k] for k in ("n_layer", "n_head", "n_embd")},
                               "grid": list(grid), **result}
            print("prior", json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_json(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
