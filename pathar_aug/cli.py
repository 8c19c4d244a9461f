"""The `pathar-aug` command line: train on your folders, synthesize into nnU-Net v2, measure."""
from __future__ import annotations

import functools
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

console = Console(stderr=True)

MANUAL = """
Synthetic image-mask pairs for nuclei segmentation (PathAR), written straight into nnU-Net v2.

[bold]Typical session[/bold]

  1. pathar-aug train --images raw/ --masks masks/ --out runs/nuclei
        trains the Dual-VQ tokenizer and the autoregressive prior on your labelled patches
  2. pathar-aug import --images raw/ --masks masks/ --into 500
        (optional) turns the same folders into an nnU-Net raw dataset Dataset500_...
  3. pathar-aug synthesize --model runs/nuclei --into 500 --n 400
        adds 400 synthetic pairs; validation folds keep real cases only
  4. nnUNetv2_plan_and_preprocess -d 500 ; nnUNetv2_train 500 2d 0
  5. pathar-aug clean --from 500
        removes exactly the synthetic cases again

[bold]Try it first[/bold]: pathar-aug demo   (bundled real data, about 10 minutes on 2 CPU cores)

Folders: images and masks pair by file stem (PNG, TIFF, JPEG images; PNG/TIFF masks, binary or
instance ids). Labels come from --labels name,label CSV, else from subfolder names, else one label.
nnU-Net folders come from $nnUNet_raw / $nnUNet_preprocessed, or --nnunet-raw / --nnunet-preprocessed.
"""

app = typer.Typer(help=MANUAL, no_args_is_help=True, rich_markup_mode="rich", add_completion=False,
                  pretty_exceptions_enable=False)


class Preset(str, Enum):
    tiny = "tiny"
    cpu = "cpu"
    paper = "paper"


def user_errors(fn: Callable) -> Callable:
    """Turn the errors a user can fix into one red line and exit code 2 (no traceback)."""
    from nnunet_integration.dataset import IncompatibleDatasetError
    from nnunet_integration.manifest import ManifestError
    from nnunet_integration.paths import DatasetResolutionError
    from pathar_aug.ingest import IngestError
    from pathar_aug.pipeline import RunError

    fixable = (IngestError, RunError, DatasetResolutionError, IncompatibleDatasetError, ManifestError,
               FileExistsError, FileNotFoundError, ValueError)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except fixable as exc:
            console.print(f"[bold red]error:[/bold red] {exc}")
            raise typer.Exit(2)

    return wrapper


def _device(name: str):
    from pathar_aug.device import resolve_device

    return resolve_device(name)


# --------------------------------------------------------------------------------------- train
@app.command()
@user_errors
def train(
    images: Path = typer.Option(..., help="Folder of images (PNG/TIFF/JPEG; subfolders = labels)."),
    masks: Path = typer.Option(..., help="Folder of masks with the same file stems (binary or instance ids)."),
    labels: Optional[Path] = typer.Option(None, help="CSV 'name,label' giving each image's condition label."),
    preset: Preset = typer.Option(Preset.cpu, help="tiny: tests; cpu: a 2-core machine; paper: the paper's setting (GPU)."),
    out: Path = typer.Option(Path("runs/pathar"), help="Run folder: config, checkpoints, loss logs, previews."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ..."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out where it stopped."),
    tokenizer_steps: Optional[int] = typer.Option(None, help="Override the preset's tokenizer training steps."),
    prior_steps: Optional[int] = typer.Option(None, help="Override the preset's prior training steps."),
    batch_size: Optional[int] = typer.Option(None, help="Override both stages' batch size."),
    val_fraction: float = typer.Option(0.1, help="Share of source images per label held out (never trained on)."),
    seed: int = typer.Option(0, help="Seed for the split, initialisation and batches."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Train the generator (tokenizer, then prior) on your image and mask folders.

    Everything lands in one run folder; an interrupted run continues with --resume. Patches are
    cut from your images at the preset's patch size (128 px for cpu, 256 px for paper); source
    images are split per label so held-out images never reach training.
    """
    from pathar_aug.pipeline import make_settings, train_run

    settings = make_settings(images, masks, labels, preset.value,
                             {"steps": tokenizer_steps, "batch_size": batch_size},
                             {"steps": prior_steps, "batch_size": batch_size}, val_fraction, seed)
    train_run(out, settings, _device(device), resume=resume, show_progress=not quiet, log=console.print)
    console.print(f"\n[bold green]done[/bold green]: model in {out}  (preview: {out / 'samples_preview.png'})")
    console.print(f"next: pathar-aug synthesize --model {out} --into 501 --n 400")


# ---------------------------------------------------------------------------------- synthesize
@app.command()
@user_errors
def synthesize(
    model: Path = typer.Option(..., help="A run folder made by `pathar-aug train`."),
    into: str = typer.Option(..., help="nnU-Net raw dataset: id (501), name (Dataset501_Nuclei) or path. Created if absent."),
    n: int = typer.Option(400, help="Number of image-mask pairs (per label with --per-label)."),
    label: Optional[str] = typer.Option(None, help="Condition label for every pair (default: spread over all labels)."),
    per_label: bool = typer.Option(False, "--per-label", help="Make --n pairs for each label."),
    masks_from: Optional[Path] = typer.Option(None, help="Render images for these masks (mask-conditioned) instead of sampling masks."),
    cfg: float = typer.Option(1.5, "--cfg", help="Classifier-free guidance scale (1 = none)."),
    temperature: float = typer.Option(0.85, help="Sampling temperature."),
    top_k: int = typer.Option(100, help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(0.92, help="Nucleus sampling mass (1 = off)."),
    seed: int = typer.Option(0, help="Seed: the same settings give the same pairs."),
    batch_size: int = typer.Option(32, help="Images sampled together (memory grows with it)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    nnunet_raw: Optional[Path] = typer.Option(None, help="nnU-Net raw folder (default $nnUNet_raw)."),
    nnunet_preprocessed: Optional[Path] = typer.Option(None, help="nnU-Net preprocessed folder (default $nnUNet_preprocessed)."),
) -> None:
    """Add synthetic pairs to an nnU-Net v2 raw dataset (imagesTr/labelsTr, dataset.json).

    Cases are named pathar_<tag>_<label>_<i>, a prefix real cases may not use, and are listed in
    pathar_aug_manifest.json with the settings that made them. dataset.json is updated atomically;
    a run killed half-way leaves a valid dataset and the same command completes it.

    [bold]Validation folds stay real.[/bold] nnU-Net reads splits_final.json from the dataset's
    preprocessed folder and never regenerates it, so cases added after it exists would join no fold.
    When that folder is known, this command writes or updates splits_final.json so that every
    fold trains on its real cases plus all synthetic cases and validates on real cases only
    (nnU-Net's own 5 folds over the real cases). Preprocess again after adding cases.
    """
    from pathar_aug.synthesize import synthesize_into

    synthesize_into(model=model, into=into, n=n, label=label, per_label=per_label, masks_from=masks_from,
                    guidance=cfg, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    batch_size=batch_size, device=_device(device), nnunet_raw=nnunet_raw,
                    nnunet_preprocessed=nnunet_preprocessed, log=console.print)


# ------------------------------------------------------------------------------ import / clean
@app.command("import")
@user_errors
def import_(
    images: Path = typer.Option(..., help="Folder of images."),
    masks: Path = typer.Option(..., help="Folder of masks with the same file stems."),
    into: str = typer.Option(..., help="nnU-Net raw dataset: id, name or path. Created if absent."),
    labels: Optional[Path] = typer.Option(None, help="CSV 'name,label' (recorded; nnU-Net itself does not use it)."),
    nnunet_raw: Optional[Path] = typer.Option(None, help="nnU-Net raw folder (default $nnUNet_raw)."),
) -> None:
    """Turn your real image and mask folders into an nnU-Net v2 raw dataset (RGB PNG, labels 0/1).

    Every file is read and checked before anything is written; existing cases are never
    overwritten.
    """
    from pathar_aug.synthesize import import_real

    import_real(images, masks, into, labels, nnunet_raw, log=console.print)


@app.command()
@user_errors
def clean(
    from_: str = typer.Option(..., "--from", help="nnU-Net raw dataset: id, name or path."),
    nnunet_raw: Optional[Path] = typer.Option(None, help="nnU-Net raw folder (default $nnUNet_raw)."),
    nnunet_preprocessed: Optional[Path] = typer.Option(None, help="nnU-Net preprocessed folder (default $nnUNet_preprocessed)."),
) -> None:
    """Remove exactly the synthetic cases listed in the manifest; restore dataset.json and splits.

    Real cases and any other file are left untouched.
    """
    from nnunet_integration.clean import clean_synthetic
    from nnunet_integration.paths import resolve_dataset

    dataset = resolve_dataset(from_, nnunet_raw, create=False)
    report = clean_synthetic(dataset, nnunet_preprocessed)
    console.print(f"cleaned {dataset}: {report}")


# ---------------------------------------------------------------------------------------- demo
@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("pathar_demo"), help="Folder for the demo run and its nnU-Net folders."),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    tokenizer_steps: int = typer.Option(300, help="Tokenizer steps (the cpu preset's, shortened so the demo fits ~10 min)."),
    prior_steps: int = typer.Option(200, help="Prior steps (shortened likewise)."),
    n: int = typer.Option(24, help="Synthetic pairs per label."),
) -> None:
    """Train on the bundled real data, synthesize into an nnU-Net dataset, check and preprocess it.

    Data: 36 real CC0 images of the 2018 Data Science Bowl (BBBC038; Caicedo et al., Nature
    Methods 2019) in three modalities, bundled with the package. Runs the cpu preset with fewer
    steps, so it shows the whole chain working, not the quality of a full run.
    """
    from pathar_aug.demo import run_demo

    run_demo(out, _device(device), tokenizer_steps, prior_steps, n, log=console.print)


# ----------------------------------------------------------------------------------- benchmark
# (the benchmark command goes here)


# ------------------------------------------------------------------------------------ evaluate
# (the evaluate command goes here)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
