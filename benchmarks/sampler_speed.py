"""Speed of the batched KV-cache sampler against the no-cache reference and the matmul peak.

    python benchmarks/sampler_speed.py [--device cpu|cuda|auto] [--presets cpu paper] [--batches 1 8 32 64]

For each prior preset (random weights: speed does not depend on training) on a 16 x 16 grid
(N = 256 locations, sequence 513) with 1024 structure and 1024 appearance codes, and each batch
size B (images), with classifier-free guidance on (so the prior runs on 2B rows):

* the cached sampler (``sample_tokens``) is timed over a full run, N + 1 = 257 decoding steps;
* the no-cache sampler (whole prefix recomputed each step) is timed at a few steps only and its
  full run is extrapolated: the cost of step i is a low-degree polynomial in the prefix length, so
  the sum over i = 1..N is estimated by Gauss-Legendre quadrature on the timed steps (exact for
  cubics), plus the timed CLS step. The JSON records the steps timed;
* effective GFLOP/s counts the prior's useful matmul FLOPs of one cached run: 2 x linear weights x
  tokens (blocks and heads) plus attention QK^T and AV over the keys each query may see, for both
  guidance rows; ``fraction_of_matmul_peak`` divides it by the best float32 torch.mm rate measured
  in the same process (at the start and at the end of the run);
* with ``--decode``, the tokenizer of the same preset (random weights, its grid must be 16 x 16)
  decodes each batch's token grids into 256² (paper) images and masks, in chunks of 64 as
  ``Generator.generate`` does: ``seconds_per_image_with_decode`` is the whole pipeline per image,
  the figure the paper's 0.086 s compares with.

Writes benchmarks/results/sampler_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pathar_aug.config import from_preset, save_json, to_dict
from pathar_aug.device import autocast, resolve_device
from pathar_aug.prior import PRIOR_PRESETS, InterleavedPrior
from pathar_aug.sampler import GuidedDecoder, SamplingConfig, sample_from_logits, sample_tokens
from pathar_aug.tokenizer import TOKENIZER_PRESETS, DualVQTokenizer

GRID = (16, 16)
PAPER_SECONDS_PER_IMAGE = 0.086  # Table X, RTX A6000, 256 x 256, whole pipeline
RESULTS = Path(__file__).resolve().parent / "results" / "sampler_speed.json"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: torch.device, size: int, dtype=torch.float32, repeats: int = 3) -> float:
    """Best-of-``repeats`` torch.mm rate (GFLOP/s) on size x size matrices."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    inner = 10 if device.type == "cpu" else 50
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        sync(device)
        best = max(best, 2 * size**3 * inner / (time.perf_counter() - t0) / 1e9)
    return best


def flops_per_sequence(prior: InterleavedPrior) -> float:
    """Useful matmul FLOPs of one sequence decoded with the KV cache (one guidance row)."""
    n, c, layers = prior.num_locations, prior.cfg.n_embd, prior.cfg.n_layer
    block_linear = sum(m.weight.numel() for m in prior.blocks.modules() if isinstance(m, torch.nn.Linear))
    linear = 2 * block_linear * (2 * n + 1)
    heads = 2 * c * (prior.num_structure_codes * (n + 1) + prior.num_appearance_codes * n)
    i = np.arange(1, n + 1)
    keys_seen = 1 + np.sum(i + 1) + np.sum(2 * i + 1)  # CLS sees 1; s_i sees i + 1; ā_i sees 2i + 1
    attention = layers * 4 * c * float(keys_seen)  # QK^T and AV: 2 * C FLOPs per (query, key) each
    return float(linear + heads + attention)


def gauss_legendre_steps(n: int, points: int) -> tuple[list[int], list[float]]:
    """Integer steps and weights approximating sum_{i=1..n} f(i) by quadrature on [0.5, n + 0.5]."""
    x, w = np.polynomial.legendre.leggauss(points)
    half = n / 2
    steps = [int(round(half * xi + (n + 1) / 2)) for xi in x]
    return steps, [float(half * wi) for wi in w]


def time_cached(prior, batch: int, scfg: SamplingConfig, device: torch.device) -> float:
    labels = torch.arange(batch) % prior.num_labels
    sync(device)
    t0 = time.perf_counter()
    sample_tokens(prior, labels, scfg, device)
    sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def warm_up(prior, scfg: SamplingConfig, device: torch.device, steps: int = 4) -> None:
    """A few cached steps (allocator, kernels, compilation when asked) before anything is timed."""
    labels = torch.zeros(2, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with autocast(device):
        decoder = GuidedDecoder(prior, labels, scfg.guidance, compile=scfg.compile)
        s = sample_from_logits(decoder.start(), scfg, gen)
        for i in range(1, steps + 1):
            s_logits, a_logits = decoder.step(i, s, s)
            s = sample_from_logits(s_logits, scfg, gen)
    sync(device)


@torch.inference_mode()
def time_nocache(prior, batch: int, scfg: SamplingConfig, device: torch.device, points: int):
    """Extrapolated seconds of a full no-cache run of ``batch`` images, and the steps timed."""
    n = prior.num_locations
    labels = (torch.arange(batch) % prior.num_labels).to(device)
    gen = torch.Generator(device=device).manual_seed(scfg.seed)
    steps, weights = gauss_legendre_steps(n, points)
    with autocast(device):
        decoder = GuidedDecoder(prior, labels, scfg.guidance, use_cache=False)
        # history the timed steps recompute: random tokens are as costly as sampled ones
        decoder.structure.random_(0, prior.num_structure_codes)
        decoder.appearance_in.random_(0, prior.num_appearance_codes)
        s = torch.zeros(batch, dtype=torch.long, device=device)

        def one(i: int) -> float:
            sync(device)
            t0 = time.perf_counter()
            if i == 0:
                sample_from_logits(decoder.start(), scfg, gen)
            else:
                s_logits, a_logits = decoder.step(i, s, s)
                sample_from_logits(s_logits, scfg, gen), sample_from_logits(a_logits, scfg, gen)
            sync(device)
            return time.perf_counter() - t0

        one(steps[0])  # warm-up
        timed = {i: one(i) for i in [0, *steps]}
    total = timed[0] + sum(w * timed[i] for i, w in zip(steps, weights))
    return total, {str(i): round(t, 5) for i, t in timed.items()}


@torch.inference_mode()
def time_decode(tokenizer: DualVQTokenizer, batch: int, device: torch.device) -> float:
    """Seconds to decode ``batch`` token grids into images and masks (chunks of 64, as generate)."""
    h = w = GRID[0]
    s = torch.randint(0, tokenizer.cfg.structure_codes, (batch, h, w), device=device)
    a = torch.randint(0, tokenizer.cfg.appearance_codes, (batch, h, w), device=device)
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, batch, 64):
        with autocast(device):
            images, masks = tokenizer.decode(s[start:start + 64], a[start:start + 64])
        images.cpu(), masks.cpu()
    sync(device)
    return time.perf_counter() - t0


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        models = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        info["cpu_model"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu_model"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"], choices=sorted(PRIOR_PRESETS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--codes", type=int, default=1024, help="structure and appearance codebook size")
    parser.add_argument("--nocache-points", type=int, default=2, help="no-cache steps timed (quadrature)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the cached step")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. why --threads)")
    parser.add_argument("--decode", action="store_true", help="also time the tokenizer's decoding (whole pipeline)")
    parser.add_argument("--no-nocache", action="store_true", help="skip the no-cache reference timing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    peak_size = 2048 if device.type == "cpu" else 8192
    peak_start = matmul_peak_gflops(device, peak_size)
    scfg = SamplingConfig(compile=args.compile)  # paper sampling: g 1.5, T 0.85, top-k 100, top-p 0.92

    results: dict = {}
    for preset in args.presets:
        cfg = from_preset(PRIOR_PRESETS, preset)
        prior = InterleavedPrior(cfg, args.codes, args.codes, GRID, num_labels=3).to(device).eval()
        flops_image = 2 * flops_per_sequence(prior)  # two rows per image: conditional + null label
        n = prior.num_locations
        warm_up(prior, scfg, device)
        tokenizer = None
        if args.decode:
            tcfg = from_preset(TOKENIZER_PRESETS, preset, structure_codes=args.codes, appearance_codes=args.codes)
            if tcfg.patch_size // tcfg.downsample != GRID[0]:
                raise SystemExit(f"--decode: the {preset} tokenizer's grid is not {GRID}")
            tokenizer = DualVQTokenizer(tcfg).to(device).eval()
            time_decode(tokenizer, 2, device)  # warm-up
        rows = {}
        for batch in args.batches:
            bcfg = SamplingConfig(**(to_dict(scfg) | {"batch_size": batch}))
            cached = time_cached(prior, batch, bcfg, device)
            if args.no_nocache:
                nocache, nocache_steps = float("nan"), {}
            else:
                nocache, nocache_steps = time_nocache(prior, batch, bcfg, device, args.nocache_points)
            gflops = flops_image * batch / cached / 1e9
            rows[str(batch)] = {
                "images": batch,
                "forward_rows": 2 * batch,
                "seconds_cached": round(cached, 3),
                "seconds_per_image": round(cached / batch, 4),
                "images_per_s": round(batch / cached, 4),
                "tokens_per_s": round(2 * n * batch / cached, 1),
                "effective_gflops_per_s": round(gflops, 2),
                "fraction_of_matmul_peak": None,  # filled in below, once the end peak is known
                "seconds_nocache_extrapolated": round(nocache, 2),
                "nocache_seconds_per_timed_step": nocache_steps,
                "speedup_vs_nocache": round(nocache / cached, 2),
            }
            if args.no_nocache:
                rows[str(batch)] |= {"seconds_nocache_extrapolated": None, "speedup_vs_nocache": None}
            if tokenizer is not None:
                decode = time_decode(tokenizer, batch, device)
                rows[str(batch)] |= {"seconds_decode": round(decode, 3),
                                     "seconds_per_image_with_decode": round((cached + decode) / batch, 4),
                                     "image_size": tokenizer.cfg.patch_size}
            print(f"{preset:>6} batch {batch:>3}: {batch / cached:8.3f} img/s  {2 * n * batch / cached:9.1f} tok/s  "
                  f"{gflops:7.1f} GFLOP/s  no-cache x{nocache / cached:6.1f}", flush=True)
        results[preset] = {
            "config": {k: to_dict(cfg)[k] for k in ("n_layer", "n_head", "n_embd")},
            "parameters": prior.num_parameters(),
            "gflop_per_image": round(flops_image / 1e9, 3),
            "batches": rows,
        }
        del prior, tokenizer

    peak_end = matmul_peak_gflops(device, peak_size)
    peak = max(peak_start, peak_end)
    for preset in results.values():
        for row in preset["batches"].values():
            row["fraction_of_matmul_peak"] = round(row["effective_gflops_per_s"] / peak, 3)
    if device.type == "cuda" and "paper" in results:
        results["paper"]["paper_seconds_per_image"] = PAPER_SECONDS_PER_IMAGE
        results["paper"]["bf16_matmul_peak_gflops"] = round(matmul_peak_gflops(device, peak_size, torch.bfloat16), 1)

    report = {
        "device": str(device),
        "machine": machine_info(device),
        "settings": {
            "grid": list(GRID),
            "sequence_length": 2 * GRID[0] * GRID[1] + 1,
            "codes": {"structure": args.codes, "appearance": args.codes},
            "sampling": to_dict(scfg),
            "guidance_doubles_batch": "yes: each image is decoded on 2 rows (label and null label); "
                                      "batch = images, forward_rows = 2 x images",
            "weights": "random (speed does not depend on training)",
            "precision": "bf16 autocast" if device.type == "cuda" else "float32",
            "cached_timing": "full sample_tokens run: N + 1 = 257 steps, sampling included",
            "nocache_timing": f"{args.nocache_points}-point Gauss-Legendre quadrature over the steps "
                              "(steps timed listed per batch) plus the CLS step, then summed",
            "flop_count": "2 x linear weights x tokens (blocks + both heads) + attention QK^T and AV "
                          "over the keys each query may see; both guidance rows; embeddings, norms, "
                          "softmax and sampling not counted",
            "peak": f"best float32 torch.mm of {peak_size}x{peak_size} (x10, best of 3), start and end of run",
        },
        "matmul_peak_gflops": {"start": round(peak_start, 1), "end": round(peak_end, 1), "used": round(peak, 1)},
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "note": " ".join(filter(None, ["measured once on a machine shared with other jobs; the load average "
                                       "shows how busy it was.", args.note])),
        "presets": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_json(report, args.out)
    print(json.dumps({p: {b: (r["images_per_s"], r["speedup_vs_nocache"], r["fraction_of_matmul_peak"])
                          for b, r in v["batches"].items()} for p, v in results.items()}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
