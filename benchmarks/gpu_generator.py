"""The DSB2018 generator trained at a larger scale on one GPU, inside one 10-minute device call.

    python -m benchmarks.gpu_generator pack                  # here: DSB2018 -> .gpu_data/ (lossless)
    python -m benchmarks.gpu_generator train OUT [--budget-s 420]    # on the GPU machine
    python -m benchmarks.gpu_generator unpack OUT_FILES [--run RUN]  # here: the returned files -> a run folder

The run keeps the `cpu` preset's architecture and DSB2018 split (seed 0, 20 % of each modality's
source images held out), so that ``generation_quality --run`` evaluates it here, on CPU, with the
same evaluator as the CPU-trained run; what changes is the scale of training: batches four times
larger and as many steps as the time budget allows. Each stage's speed is measured first with a
short probe in a scratch folder, and the steps are set from it (a budget share per stage), so the
learning-rate schedules run to their end. The CPU run saw 1,200 x 16 tokenizer samples and
2,000 x 8 prior sequences (0.35 epoch of its token cache).

``pack`` stores DSB2018's images as lossless WebP (gray images as one channel: decoding gives back
the PNGs' pixels exactly, checked while packing) so that data and repository travel together
within the device machine's 64 MiB; ``train`` writes PNGs again before the run ingests them.
``train`` writes into OUT the run folder without its data and token caches, optimizer states
dropped, as ``run.tgz.NN`` pieces under 16 MB, and ``train.log``.

The two committed runs (README, "Trained on one GPU"), each one device call with .gpu_data carried:
    PYTHONPATH=$PWD python3 -m benchmarks.gpu_generator train $OUT --budget-s 390
    PYTHONPATH=$PWD python3 -m benchmarks.gpu_generator train $OUT --budget-s 310 \
        --appearance-partner 0.5 --tokenizer-steps 2800 --prior-steps 8300
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import DSB_ROOT, REPO, RESULTS, VAL_FRACTION, WORK, dsb2018_labels_csv

PACKED = REPO / ".gpu_data"
PIECE_BYTES = 15 * 1024 * 1024
SCALE = {"tokenizer_batch": 64, "prior_batch": 64, "prior_lr": 1e-3}
# shares of the training budget: tokenizer, prior; the rest is data, token cache, filter, sampling defaults
SHARES = {"tokenizer": 0.32, "prior": 0.42}
PROBE_STEPS = 30


def pack() -> None:
    """DSB2018 -> .gpu_data: images as lossless WebP, masks as 1-bit PNG, metadata.csv."""
    for sub in ("images", "masks"):
        (PACKED / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(DSB_ROOT / "metadata.csv", PACKED / "metadata.csv")
    for path in sorted((DSB_ROOT / "images").glob("*.png")):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        gray = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all())
        out = PACKED / "images" / f"{path.stem}.webp"
        if not out.exists():
            Image.fromarray(rgb[..., 0] if gray else rgb).save(out, lossless=True, quality=100, method=5)
        if not np.array_equal(np.asarray(Image.open(out).convert("RGB")), rgb):
            raise SystemExit(f"{out}: WebP did not give back the pixels of {path}")
        mask = np.asarray(Image.open(DSB_ROOT / "masks" / path.name)) > 0
        Image.fromarray(mask).save(PACKED / "masks" / path.name, optimize=True)
    size = sum(p.stat().st_size for p in PACKED.rglob("*") if p.is_file())
    print(f"packed {len(list((PACKED / 'images').glob('*.webp')))} images into {PACKED} ({size / 2**20:.1f} MiB)")


def _unpack_data(dest: Path, max_images: int | None = None) -> Path:
    """.gpu_data -> dest/{images,masks} PNGs with DSB2018's pixels, dest/metadata.csv
    (``max_images``: every n-th image only, for a quick check)."""
    for sub in ("images", "masks"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(PACKED / "metadata.csv", dest / "metadata.csv")
    packed = sorted((PACKED / "images").glob("*.webp"))
    for path in packed[::max(1, len(packed) // max_images)] if max_images else packed:
        Image.open(path).convert("RGB").save(dest / "images" / f"{path.stem}.png", compress_level=1)
        mask = np.asarray(Image.open(PACKED / "masks" / f"{path.stem}.png")).astype(np.uint8) * 255
        Image.fromarray(mask).save(dest / "masks" / f"{path.stem}.png", compress_level=1)
    return dest


def _steps_for(seconds: float, probe_s: float) -> int:
    """Steps that fit ``seconds`` at the probe's pace (its start-up counted in: errs short), in hundreds."""
    return max(100, int(seconds / (probe_s / PROBE_STEPS)) // 100 * 100)


def _set_steps(run_dir: Path, **changes) -> None:
    from pathar_aug.pipeline import RunInfo

    info = RunInfo.load(run_dir)
    info.settings = dataclasses.replace(info.settings, **{
        stage: dataclasses.replace(getattr(info.settings, stage), **fields) for stage, fields in changes.items()})
    info.save()


def train(out: Path, budget_s: float, preset: str = "cpu", max_images: int | None = None,
          appearance_partner: float = 0.0, steps: tuple[int | None, int | None] = (None, None)) -> None:
    """``preset`` and ``max_images`` only make a quick check of this script on CPU possible. ``steps``:
    the tokenizer's and the prior's, instead of the probes' (to repeat another run's scale)."""
    import torch

    from pathar_aug.device import resolve_device
    from pathar_aug.pipeline import (RunInfo, load_patches, make_settings, prepare_run, train_filter_stage,
                                     train_sampling_stage)
    from pathar_aug.train_prior import train_prior
    from pathar_aug.train_tokenizer import build_token_cache, load_tokenizer, train_tokenizer

    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "train.log").open("a")

    def log(msg: str) -> None:
        line = f"[{time.monotonic() - start:6.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    device = resolve_device("auto")
    log(f"device {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}")
    # a quick check on CPU works in a folder of its own: never in the unpacked runs of benchmarks/work
    base = Path("/tmp") if device.type == "cuda" else WORK / "gpu_generator_check"
    data = _unpack_data(base / "dsb2018", max_images)
    labels = dsb2018_labels_csv(data / "labels.csv", root=data)
    log("data unpacked")
    run = base / ("dsb2018_gpu" + ("_partner" if appearance_partner else ""))
    scratch = run.with_name("dsb2018_gpu_probe")
    shutil.rmtree(scratch, ignore_errors=True)
    settings = make_settings(data / "images", data / "masks", labels, preset,
                             {"batch_size": SCALE["tokenizer_batch"], "ckpt_every": 500, "preview_every": 10**6,
                              "appearance_partner": appearance_partner},
                             {"batch_size": SCALE["prior_batch"], "lr": SCALE["prior_lr"], "warmup_steps": 200,
                              "ckpt_every": 1000, "log_every": 50}, VAL_FRACTION, seed=0)
    settings = prepare_run(run, settings, resume=True)
    train_patches, heldout = load_patches(run)
    log(f"data stage: {len(train_patches)} training, {len(heldout)} held-out patches")
    train_budget = budget_s - (time.monotonic() - start)

    tok_steps = steps[0]
    if tok_steps is None:
        probe = dataclasses.replace(settings.tokenizer, steps=PROBE_STEPS, ckpt_every=10**6)
        for attempt in ("warm-up", "timed"):  # the first pays for CUDA's start-up and kernel selection
            t0 = time.monotonic()
            train_tokenizer(train_patches, scratch / attempt / "tokenizer", probe, device, show_progress=False)
        tok_steps = _steps_for(SHARES["tokenizer"] * train_budget, time.monotonic() - t0)
        log(f"tokenizer probe: {PROBE_STEPS} steps in {time.monotonic() - t0:.1f}s")
    _set_steps(run, tokenizer={"steps": tok_steps})
    log(f"tokenizer: {tok_steps} steps of {SCALE['tokenizer_batch']}")
    settings = RunInfo.load(run).settings
    ckpt = train_tokenizer(train_patches, run / "tokenizer", settings.tokenizer, device, resume=True, seed=0,
                           show_progress=False)
    log("tokenizer trained")

    tokenizer = load_tokenizer(ckpt, device)
    (run / "tokens").mkdir(exist_ok=True)
    train_tokens, heldout_tokens = run / "tokens" / "train_tokens.pt", run / "tokens" / "heldout_tokens.pt"
    if not train_tokens.exists():
        build_token_cache(tokenizer, train_patches, train_tokens, device, dihedral_views=True, batch_size=256)
    if not heldout_tokens.exists():
        build_token_cache(tokenizer, heldout, heldout_tokens, device, dihedral_views=False, batch_size=256)
    del tokenizer
    log("token caches built")

    prior_steps = steps[1]
    if prior_steps is None:
        probe = dataclasses.replace(settings.prior, steps=PROBE_STEPS, ckpt_every=10**6, eval_every=0, warmup_steps=0)
        for attempt in ("warm-up", "timed"):
            t0 = time.monotonic()
            train_prior(train_tokens, scratch / attempt / "prior", probe, device, progress=False)
        prior_steps = _steps_for(SHARES["prior"] * train_budget, time.monotonic() - t0)
        log(f"prior probe: {PROBE_STEPS} steps in {time.monotonic() - t0:.1f}s")
    _set_steps(run, prior={"steps": prior_steps, "eval_every": max(100, prior_steps // 10)})
    log(f"prior: {prior_steps} steps of {SCALE['prior_batch']}")
    settings = RunInfo.load(run).settings
    train_prior(train_tokens, run / "prior", settings.prior, device, resume=True, heldout_tokens_path=heldout_tokens,
                progress=False)
    log("prior trained")
    _export(run, out, log)  # the weights first: what follows may not finish inside the call

    train_filter_stage(run, device, settings=settings, patches=(train_patches, heldout))
    log("quality filter trained")
    train_sampling_stage(run, device, settings=settings)
    log("sampling defaults chosen")
    _export(run, out, log)


def _strip(path: Path) -> bytes:
    """A checkpoint without its optimizer state, serialised."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    state.pop("optimizer", None)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _export(run: Path, out: Path, log) -> None:
    """The run folder, less data/ and tokens/ and optimizer states, as run.tgz.NN pieces in ``out``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(run.rglob("*")):
            relative = path.relative_to(run)
            if not path.is_file() or relative.parts[0] in ("data", "tokens"):
                continue
            payload = _strip(path) if path.suffix == ".pt" else path.read_bytes()
            info = tarfile.TarInfo(str(Path(run.name) / relative))
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    blob = buffer.getvalue()
    for old in out.glob("run.tgz.*"):
        old.unlink()
    for i in range(0, len(blob), PIECE_BYTES):
        (out / f"run.tgz.{i // PIECE_BYTES:02d}").write_bytes(blob[i:i + PIECE_BYTES])
    log(f"exported {len(blob) / 2**20:.1f} MiB in {-(-len(blob) // PIECE_BYTES)} pieces")


def unpack(files: Path, run: Path) -> None:
    """The returned pieces -> ``run``, its data paths pointed at the local DSB2018 (same pixels), its
    data stage rebuilt (the same deterministic split and tiling) so that ``--resume`` works here."""
    from pathar_aug.pipeline import RunInfo, load_run_samples
    from pathar_aug.patches import make_patches, split_by_image
    from pathar_aug.training import save_checkpoint

    blob = b"".join(p.read_bytes() for p in sorted(files.glob("run.tgz.*")))
    if run.exists():
        raise SystemExit(f"{run} exists; remove it first")
    staging = run.with_name(run.name + ".unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(staging, filter="data")
    (top,) = staging.iterdir()
    top.rename(run)
    staging.rmdir()
    info = RunInfo.load(run)
    info.settings = dataclasses.replace(info.settings, images=str(DSB_ROOT / "images"), masks=str(DSB_ROOT / "masks"),
                                        labels_csv=str(dsb2018_labels_csv(WORK / "dsb2018_labels.csv")))
    info.save()
    samples = load_run_samples(info.settings)
    train_samples, heldout = split_by_image(samples, info.settings.val_fraction, info.settings.seed)
    if sorted(s.name for s in heldout) != sorted(info.heldout_sources):
        raise SystemExit("the local split differs from the run's: not the same data")
    patch, names = info.settings.tokenizer.patch_size, info.label_names
    (run / "data").mkdir(exist_ok=True)
    save_checkpoint(run / "data" / "patches.pt", train=make_patches(train_samples, patch, names),
                    heldout=make_patches(heldout, patch, names))
    print(f"unpacked into {run}; summary: {summarize(run, files)}")


def summarize(run: Path, files: Path) -> Path:
    """benchmarks/results/gpu_generator_<run>.json: the run's settings, its device log, the
    tokenizer's last logged losses and the prior's held-out NLL curve."""
    from pathar_aug.pipeline import RunInfo

    info = RunInfo.load(run)
    with (run / "tokenizer" / "tokenizer_loss.csv").open() as f:
        tokenizer_last = list(csv.DictReader(f))[-1]
    with (run / "prior" / "prior_heldout_curve.csv").open() as f:
        curve = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    best = min(curve, key=lambda r: r["heldout_structure_nll"] + r["heldout_appearance_nll"])
    report = {
        "command": f"python -m benchmarks.gpu_generator train OUT (device log below); unpack {files} --run {run}",
        "device_log": (files / "train.log").read_text().splitlines(),
        "tokenizer": dataclasses.asdict(info.settings.tokenizer), "prior": dataclasses.asdict(info.settings.prior),
        "data": {k: info.data[k] for k in ("train_patches", "heldout_patches", "train_images", "heldout_images")},
        "tokenizer_last_logged": tokenizer_last,
        "prior_heldout_curve": curve, "prior_heldout_best": best,
        "prior_heldout_final": json.loads((run / "prior" / "prior_heldout_nll.json").read_text()),
    }
    path = RESULTS / f"gpu_generator_{run.name}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("pack")
    t = sub.add_parser("train")
    t.add_argument("out", type=Path)
    t.add_argument("--budget-s", type=float, default=420, help="seconds for everything, the data stage included")
    t.add_argument("--preset", default="cpu", help="tiny: a quick check of the script on CPU")
    t.add_argument("--appearance-partner", type=float, default=0.0,
                   help="TokenizerConfig.appearance_partner of the tokenizer (a run named dsb2018_gpu_partner)")
    t.add_argument("--tokenizer-steps", type=int, default=None, help="instead of the probe's (repeat a run's scale)")
    t.add_argument("--prior-steps", type=int, default=None, help="instead of the probe's")
    t.add_argument("--max-images", type=int, default=None, help="a subset of the images: a quick check")
    u = sub.add_parser("unpack")
    u.add_argument("files", type=Path)
    u.add_argument("--run", type=Path, default=WORK / "dsb2018_gpu")
    u.add_argument("--summary-only", action="store_true", help="the run is unpacked: rewrite its summary only")
    args = ap.parse_args()
    if args.command == "pack":
        pack()
    elif args.command == "train":
        train(args.out, args.budget_s, args.preset, args.max_images, args.appearance_partner,
              (args.tokenizer_steps, args.prior_steps))
    elif args.summary_only:
        print(summarize(args.run, args.files))
    else:
        unpack(args.files, args.run)


if __name__ == "__main__":
    main()
