"""The `pathar-aug` command line: train on your folders, synthesize into nnU-Net v2, measure."""
from __future__ import annotations

import functools
import inspect
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from pathar_aug.cli_options import (
    BATCH_SIZE_OPTION, CFG_OPTION, COMPILE_OPTION, FILTER_ORDER_OPTION, TEMPERATURE_OPTION, TOP_K_OPTION, TOP_P_OPTION,
    sampling_config,
)
from pathar_aug.filter_order import DEFAULT_OVERSAMPLE

console = Console(stderr=True)

MANUAL = """
Synthetic image-mask pairs for nuclei segmentation (PathAR), written straight into nnU-Net v2.

[bold]Typical session[/bold]

  1. pathar-aug train --images raw/ --masks masks/ --out runs/nuclei
        trains the Dual-VQ tokenizer and the prior on your labelled patches
  2. pathar-aug import --images raw/ --masks masks/ --into 500
        (optional) makes the same folders an nnU-Net raw dataset, Dataset500_...
  3. pathar-aug synthesize --model runs/nuclei --into 500 --n 400
        adds 400 synthetic pairs; validation folds keep real cases only
  4. nnUNetv2_plan_and_preprocess -d 500 ; nnUNetv2_train 500 2d 0
  5. pathar-aug clean --from 500
        removes exactly the synthetic cases again

[bold]Try it first[/bold]: pathar-aug demo   (bundled real data, about 10 minutes on 2 CPU cores)

Folders: images and masks pair by file stem (PNG, TIFF, JPEG images; PNG/TIFF masks, binary or
instance ids; multi-class masks with train --classes, or --mask-mode border for instance masks). Labels come from --labels name,label CSV, else from subfolder names, else one label.
nnU-Net folders come from $nnUNet_raw / $nnUNet_preprocessed, or --nnunet-raw / --nnunet-preprocessed.
"""


def reflow(text: str) -> str:
    """A help text with its hard-wrapped lines joined, so the terminal wraps them. Typer's rich mode
    keeps single line breaks: on a terminal narrower than the source lines every line would break
    twice. Indented lines (commands, examples) and list items keep a line of their own."""
    def indented(line: str) -> bool:
        return line[:1].isspace()

    def own_line(line: str) -> bool:
        return indented(line) or re.match(r"(-|\*|\d+\.) ", line) is not None

    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        lines: list[str] = []
        for line in paragraph.split("\n"):
            if lines and not own_line(line) and not indented(lines[-1]):
                lines[-1] = f"{lines[-1]} {line}"
            else:
                lines.append(line)
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


app = typer.Typer(help=reflow(MANUAL), no_args_is_help=True, rich_markup_mode="rich", add_completion=False,
                  pretty_exceptions_enable=False)


class InitMode(str, Enum):
    auto = "auto"
    finetune = "finetune"
    freeze = "freeze"


class MaskMode(str, Enum):
    classes = "classes"
    border = "border"


class Preset(str, Enum):
    tiny = "tiny"
    cpu = "cpu"
    paper = "paper"


def user_errors(fn: Callable) -> Callable:
    """Turn the errors a user can fix into one red line and exit code 2 (no traceback)."""
    from nnunet_integration.atomic import DatasetBusyError
    from nnunet_integration.dataset import IncompatibleDatasetError
    from nnunet_integration.manifest import ManifestError
    from nnunet_integration.paths import DatasetResolutionError
    from pathar_aug.ingest import IngestError
    from pathar_aug.pipeline import RunError

    # OSError: a folder that cannot be written, a full disk ... - the message names the path
    fixable = (IngestError, RunError, DatasetResolutionError, IncompatibleDatasetError, ManifestError,
               DatasetBusyError, FileExistsError, FileNotFoundError, ValueError, OSError)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except fixable as exc:
            # escaped: file names and CSV rows may hold [brackets]; soft_wrap keeps it one line
            console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(2)

    return wrapper


def _device(name: str):
    from pathar_aug.device import user_device

    return user_device(name)


def _reporter(quiet: bool = False):
    """The one reporter of a command: log lines and progress bars on the console (rank 0's alone
    under torchrun; the other ranks stay silent)."""
    from pathar_aug import distributed
    from pathar_aug.reporter import RichReporter

    return distributed.reporter_of(RichReporter(console, progress=not quiet))[0]


def _rank_device(name: str):
    """``--device`` of a command that runs under torchrun too: joins the process group torchrun set
    up (NCCL on CUDA, gloo on the CPU) and gives each process its own GPU, cuda:LOCAL_RANK."""
    from pathar_aug import distributed

    return distributed.init(_device(name))


def _main_console(text: str) -> None:
    from pathar_aug import distributed

    if distributed.main_process():
        console.print(text)


def _typed_options(ctx: typer.Context, names: tuple[str, ...]) -> dict:
    """The options among ``names`` that were given on the command line (not left at their default)."""
    sources = {n: ctx.get_parameter_source(n) for n in names}
    return {n: ctx.params[n] for n, src in sources.items() if src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")}


# --------------------------------------------------------------------------------------- train
@app.command()
@user_errors
def train(
    ctx: typer.Context,
    images: Optional[Path] = typer.Option(None, help="Folder of images (PNG/TIFF/JPEG; subfolders = labels). Not needed with --resume."),
    masks: Optional[Path] = typer.Option(None, help="Folder of masks with the same file stems (binary or instance ids). Not needed with --resume."),
    labels: Optional[Path] = typer.Option(None, help="CSV 'name,label' giving each image's condition label."),
    dataset: Optional[str] = typer.Option(None, help="Train on an nnU-Net v2 raw dataset instead of --images/--masks: id (500), name (Dataset500_Name) or path. Its real cases are read with nnU-Net's own reader for its file_ending (.png, .tif, .nii.gz/.nrrd/.mha); 1 channel is gray, 3 channels are R, G, B in channel_names order, 2 fill R and G; 16-bit and float data are stretched per image to 8 bit."),
    nnunet_raw: Optional[Path] = typer.Option(None, help="nnU-Net raw folder for --dataset (default $nnUNet_raw)."),
    preset: Preset = typer.Option(Preset.cpu, help="tiny: tests; cpu: a 2-core machine; paper: the paper's setting (GPU)."),
    out: Path = typer.Option(Path("runs/pathar"), help="Run folder: config, checkpoints, loss logs, previews."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ..."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out where it stopped (with a larger --prior-steps or --adversarial-steps: train that stage longer)."),
    tokenizer_steps: Optional[int] = typer.Option(None, help="Override the preset's tokenizer training steps."),
    adversarial_steps: Optional[int] = typer.Option(None, help="After the tokenizer's steps, train its image decoder this many steps more on L1 plus a PatchGAN loss (a discriminator trained alongside from scratch): sharper tiles with real-looking texture instead of the L1 decoder's smooth ones. Tokens do not change, so a finished run gains it with --resume --adversarial-steps N without retraining its prior. 0 (the presets): the paper's L1 decoder. README, 'Texture'."),
    adversarial_labels: Optional[str] = typer.Option(None, help="With --adversarial-steps: the labels (comma-separated names) whose tiles the GAN term and its discriminator judge; the others' tiles keep L1 alone. For a shared decoder whose texture is too smooth for one modality and right for the others, e.g. --adversarial-labels histology. Default: every label; on --resume it may change until the first adversarial step ('' : every label again)."),
    appearance_partner: Optional[float] = typer.Option(None, help="Share (0 to 1) of each tokenizer batch decoded with the appearance codes of another tile of the same label, so that the image decoder takes the layout of nuclei from the structure tokens alone: synthetic images follow their masks more closely, at the price of softer images. Default: the preset's (0). README, 'Partner appearance'."),
    prior_steps: Optional[int] = typer.Option(None, help="Override the preset's prior training steps."),
    batch_size: Optional[int] = typer.Option(None, help="Override both stages' batch size."),
    val_fraction: float = typer.Option(0.1, help="Share of source images per label held out (never trained on)."),
    seed: int = typer.Option(0, help="Seed for the split, initialisation and batches."),
    quiet: bool = typer.Option(False, help="No progress bars."),
    compile: bool = COMPILE_OPTION,
    init: Optional[str] = typer.Option(None, help="Start both stages from a finished run of the same preset, or from the starting point shipped with the package: 'dsb2018' (cpu preset, trained on DSB2018's three modalities; labels brightfield, fluorescence, histology). Its tokenizer (see --init-tokenizer) and its prior carry over, labels matched by name (a new label starts from the mean of the known ones). What it buys over training from scratch: README, 'Starting point'."),
    init_tokenizer: InitMode = typer.Option(InitMode.auto, help="With --init: the starting run's tokenizer. 'auto': reconstruct your training tiles with it first and keep it frozen if it does as well as on its own held-out tiles (image PSNR at most 1.5 dB under the token-grid baseline, mask Dice at least 0.95, every label), else fine-tune it (the figures: RUN/tokenizer/init_fit.json). 'freeze': keep it as it is. 'finetune': train it on for --tokenizer-steps. On DSB2018 images it never saw, frozen beat fine-tuned (README, 'Starting point vs scratch')."),
    classes: Optional[str] = typer.Option(None, help="Multi-class masks in --masks folders: the classes as name=id pairs, ids 0, 1, ... K-1 with 0 the background, e.g. background=0,interior=1,border=2 (default: binary, any nonzero value is the nucleus). With --dataset the classes are dataset.json's labels."),
    mask_mode: MaskMode = typer.Option(MaskMode.classes, help="classes: mask values are class ids (binary by default); border: --masks holds instance masks, turned into background=0, interior=1, border=2 (separates touching nuclei)."),
) -> None:
    """Train the generator (tokenizer, then prior) on your image and mask folders, or on an nnU-Net dataset.

    Everything lands in one run folder; an interrupted run continues with --resume. Patches are
    cut from your images at the preset's patch size (128 px for cpu, 256 px for paper); source
    images are split per label so held-out images never reach training.

    [bold]Mask classes[/bold]: binary by default; K classes from dataset.json's labels (--dataset),
    from --classes, or from instance masks with --mask-mode border. With K > 2 the tokenizer's
    mask decoder is K-way (an extension beyond the paper, see README) and synthetic masks carry
    the class ids.

    [bold]Several GPUs or machines[/bold]: torchrun --nproc_per_node N -m pathar_aug train ...
    trains with DistributedDataParallel, one process per GPU; the batch size stays the global
    batch (it must split evenly over the processes) and rank 0 alone writes the run folder.
    """
    from pathar_aug import distributed
    from pathar_aug.pipeline import make_settings, train_run

    judged = None if adversarial_labels is None else \
        tuple(name.strip() for name in adversarial_labels.split(",") if name.strip())
    dataset_dir = None
    if dataset is not None:
        from nnunet_integration.paths import resolve_dataset

        if images is not None or masks is not None or labels is not None:
            raise ValueError("give either --dataset or --images/--masks (and --labels), not both")
        dataset_dir = resolve_dataset(dataset, nnunet_raw, create=False)
    if dataset_dir is None and (images is None or masks is None):  # a resume finds its settings in the run folder
        if not resume:
            raise ValueError("--images and --masks (or --dataset) are needed to start a run "
                             "(--resume continues one from --out alone)")
        settings = None
    else:
        settings = make_settings(images, masks, labels, preset.value,
                                 {"steps": tokenizer_steps, "batch_size": batch_size,
                                  "adversarial_steps": adversarial_steps, "adversarial_labels": judged,
                                  "appearance_partner": appearance_partner},
                                 {"steps": prior_steps, "batch_size": batch_size}, val_fraction, seed,
                                 dataset=dataset_dir, init=init, init_tokenizer=init_tokenizer.value,
                                 classes=classes, mask_mode=mask_mode.value)
    given = _typed_options(ctx, ("images", "masks", "labels", "preset", "tokenizer_steps", "adversarial_steps",
                            "adversarial_labels", "appearance_partner", "prior_steps", "batch_size", "val_fraction", "seed", "dataset", "init", "init_tokenizer", "classes",
                            "mask_mode")) if resume else None
    if given and "dataset" in given:
        given["dataset"] = str(dataset_dir)
    if given and "adversarial_labels" in given:
        given["adversarial_labels"] = judged
    if given and "classes" in given:
        from pathar_aug.mask_classes import parse_classes

        given["classes"] = parse_classes(given["classes"]).mapping()
    train_run(out, settings, _rank_device(device), resume=resume, given=given, reporter=_reporter(quiet),
              compile=compile)
    distributed.shutdown()
    _main_console(f"\n[bold green]done[/bold green]: model in {out}  (preview: {out / 'samples_preview.png'})")
    _main_console(f"next: pathar-aug synthesize --model {out} --into 501 --n 400")


# ---------------------------------------------------------------------------------- synthesize
@app.command()
@user_errors
def synthesize(
    model: Path = typer.Option(..., help="A run folder made by `pathar-aug train`."),
    into: str = typer.Option(..., help="nnU-Net raw dataset: id (501), name (Dataset501_Nuclei) or path. Created if absent."),
    n: int = typer.Option(400, "--n", "-n", help="Number of image-mask pairs (per label with --per-label). Under torchrun write -n: torchrun takes --n for one of its own options."),
    label: Optional[str] = typer.Option(None, help="Condition label for every pair (default: spread over all labels)."),
    per_label: bool = typer.Option(False, "--per-label", help="Make --n pairs for each label."),
    masks_from: Optional[Path] = typer.Option(None, help="Render images for these masks (mask-conditioned) instead of sampling masks."),
    cfg: Optional[float] = CFG_OPTION,
    temperature: Optional[float] = TEMPERATURE_OPTION,
    top_k: Optional[int] = TOP_K_OPTION,
    top_p: Optional[float] = TOP_P_OPTION,
    seed: int = typer.Option(0, help="Seed: the same settings, device and number of CPU threads give the same pairs "
                                     "(another thread count can change a few)."),
    batch_size: int = BATCH_SIZE_OPTION,
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    nnunet_raw: Optional[Path] = typer.Option(None, help="nnU-Net raw folder (default $nnUNet_raw)."),
    nnunet_preprocessed: Optional[Path] = typer.Option(None, help="nnU-Net preprocessed folder (default $nnUNet_preprocessed)."),
    quality_filter: bool = typer.Option(True, "--filter/--no-filter", help="Keep only pairs whose image and mask agree (see below); --no-filter writes every sampled pair."),
    oversample: float = typer.Option(DEFAULT_OVERSAMPLE, help="Filter: candidates drawn per requested pair, 1 to 10 (sampling time grows with it)."),
    min_agreement: Optional[float] = typer.Option(None, help="Filter: minimum image-mask Dice for every label (default: per label, the 10th percentile of real held-out tiles)."),
    filter_order: str = FILTER_ORDER_OPTION,
    channels: Optional[str] = typer.Option(None, help="Convert the generator's images for a dataset with other channels: gray (RGB -> 1 channel, luminance) or rgb (gray -> 3 channels). Without it a mismatch is refused."),
    compile: bool = COMPILE_OPTION,
) -> None:
    """Add synthetic pairs to an nnU-Net v2 raw dataset (imagesTr/labelsTr, dataset.json).

    Cases are written in the dataset's own format: its file_ending and nnU-Net reader/writer
    (.png; .tif with its spacing .json; .nii.gz, .nrrd, .mha), its channels (one RGB PNG, or one
    file per channel, _0000, _0001 ...), the pixel type and intensity range of its real cases, their
    spacing (and origin, direction) where the format stores one, and its label ids (0 / 1 for a
    binary generator; a multi-class generator needs the dataset's labels to be its classes, and a
    new dataset gets them).

    Cases are named pathar_<tag>_<label>_<i>, a prefix real cases may not use, and are listed in
    pathar_aug_manifest.json with the settings that made them. dataset.json is updated atomically;
    a run killed half-way leaves a valid dataset and the same command completes it.

    [bold]Validation folds stay real.[/bold] nnU-Net reads splits_final.json from the dataset's
    preprocessed folder and never regenerates it, so cases added after it exists would join no fold.
    When that folder is known, this command writes or updates splits_final.json so that every
    fold trains on its real cases plus all synthetic cases and validates on real cases only
    (nnU-Net's own 5 folds over the real cases). Preprocess again after adding cases.

    [bold]Quality filter (on by default).[/bold] The run's own segmenter, trained on its real
    training patches, segments each generated image; its Dice against the generated mask is the
    pair's agreement. --oversample candidates are drawn per requested pair and, per label, the first
    as drawn (--filter-order agreement: the best) are kept among those reaching the threshold
    (default: the 10th percentile of the same segmenter's Dice on real held-out tiles of that
    label); empty and full masks are kept at most
    at the real data's rate. Each kept pair's scores are recorded in the manifest and the
    acceptance rate per label is printed. No more than --oversample x --n candidates are ever drawn:
    a label with too few passing candidates gets fewer pairs, and the command says how many were
    written against how many were requested. Masks given with --masks-from are scored, never
    dropped. A run trained before the filter existed gets it trained once, on first use
    (`pathar-aug train --out RUN --resume` adds it too).

    [bold]Several GPUs or machines[/bold]: torchrun --nproc_per_node N -m pathar_aug synthesize ...
    shares the chunks out over the processes; rank 0 alone writes the dataset, and the pairs are
    those one process makes with the same seed.
    """
    import dataclasses

    from pathar_aug import distributed
    from pathar_aug.synthesize import acceptance_lines, synthesize_into

    reporter = _reporter()
    sampling = sampling_config(cfg, temperature, top_k, top_p, seed, batch_size, model)
    result = synthesize_into(model=model, into=into, n=n, label=label, per_label=per_label, masks_from=masks_from,
                             sampling=dataclasses.replace(sampling, compile=compile), device=_rank_device(device),
                             nnunet_raw=nnunet_raw, nnunet_preprocessed=nnunet_preprocessed,
                             quality_filter=quality_filter, oversample=oversample, min_agreement=min_agreement,
                             channels=channels, reporter=reporter, filter_order=filter_order)
    distributed.shutdown()
    for line in acceptance_lines(result) if distributed.main_process() else ():
        reporter.log(line)


# ------------------------------------------------------------------------------ import / clean
@app.command("import")
@user_errors
def import_(
    images: Path = typer.Option(..., help="Folder of images."),
    masks: Path = typer.Option(..., help="Folder of masks with the same file stems."),
    into: str = typer.Option(..., help="nnU-Net raw dataset: id, name or path. Created if absent."),
    labels: Optional[Path] = typer.Option(None, help="CSV 'name,label' (recorded; nnU-Net itself does not use it)."),
    nnunet_raw: Optional[Path] = typer.Option(None, help="nnU-Net raw folder (default $nnUNet_raw)."),
    classes: Optional[str] = typer.Option(None, help="Multi-class masks: the classes as name=id pairs, ids 0, 1, ... K-1 with 0 the background (default: binary, any nonzero value is the nucleus); they become dataset.json's labels."),
    mask_mode: MaskMode = typer.Option(MaskMode.classes, help="classes: mask values are class ids (binary by default); border: --masks holds instance masks, written as background=0, interior=1, border=2 as a border run's synthetic cases are."),
) -> None:
    """Turn your real image and mask folders into an nnU-Net v2 raw dataset (RGB PNG, labels 0/1,
    or the classes of --classes / --mask-mode border).

    Every file is read and checked before anything is written; existing cases are never
    overwritten.
    """
    from pathar_aug.synthesize import import_real

    import_real(images, masks, into, labels, nnunet_raw, reporter=_reporter(), classes=classes,
                mask_mode=mask_mode.value)


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
    console.print(f"cleaned {dataset}: {report.summary()}")


# ---------------------------------------------------------------------------------------- demo
@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("pathar_demo"), help="Folder for the demo run and its nnU-Net folders."),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    init: Optional[str] = typer.Option("dsb2018", help="Starting point the generator is fine-tuned from: the shipped 'dsb2018', a run folder, or 'none' to train from scratch (minutes of CPU do not teach it nuclei; README, 'Starting point')."),
    init_tokenizer: InitMode = typer.Option(InitMode.freeze, help="The starting point's tokenizer: freeze it (the demo's default: it already reconstructs all three modalities), fine-tune it for --tokenizer-steps, or 'auto' (see train --help)."),
    tokenizer_steps: int = typer.Option(150, help="Tokenizer steps when fine-tuned or trained from scratch."),
    prior_steps: int = typer.Option(200, help="Prior fine-tuning steps (the cpu preset's batch of 8)."),
    n: int = typer.Option(24, help="Synthetic pairs per label."),
) -> None:
    """Fine-tune the generator on the bundled real data, synthesize into an nnU-Net dataset, check and preprocess it.

    Data: 36 real CC0 images of the 2018 Data Science Bowl (BBBC038; Caicedo et al., Nature
    Methods 2019) in three modalities, bundled with the package. The generator starts from the
    shipped DSB2018 starting point and is fine-tuned on them; the quality filter keeps the pairs
    whose image agrees with its mask. Ends with a summary (cases per label, empty-mask shares,
    what the filter kept) and demo_preview.png, the synthetic pairs as written; nnU-Net's own
    planner output goes to nnunet_plan_and_preprocess.log. Rerun to resume.
    """
    from pathar_aug.demo import run_demo

    start = None if init is not None and init.lower() == "none" else init
    run_demo(out, _device(device), tokenizer_steps, prior_steps, n, init=start,
             init_tokenizer=init_tokenizer.value, reporter=_reporter())


# ----------------------------------------------------------------------------------- benchmark
@app.command()
@user_errors
def benchmark(
    images: Optional[Path] = typer.Option(None, help="Folder of images (default: the bundled demo data)."),
    masks: Optional[Path] = typer.Option(None, help="Folder of masks with the same file stems (default: the demo masks)."),
    labels: Optional[Path] = typer.Option(None, help="CSV 'name,label' giving each image's condition label."),
    real: int = typer.Option(30, help="Real training tiles per label in every group with real data."),
    synthetic: str = typer.Option("0,100,200,400", help="Synthetic tiles per label added to the real ones, one group each (0 = real only)."),
    synthetic_only: Optional[int] = typer.Option(None, help="Group of synthetic tiles only, no real ones (default: the smallest positive count; 0 = none)."),
    extra_rows: str = typer.Option("largest", help="Mask-conditioned, classical-augmentation and filtered rows: at the largest count, at all counts, or none."),
    extra_kinds: str = typer.Option("rendered,classical,filtered", help="Rows beside real + synthetic, comma-separated: rendered (the pool's masks re-rendered by the generator), classical (the real tiles augmented), filtered (generated pairs chosen by the run's quality filter)."),
    unfiltered: bool = typer.Option(True, help="Rows of real + unfiltered synthetic tiles; --no-unfiltered keeps only the extra rows beside group I (e.g. to judge the filtered default alone)."),
    filter_order: str = FILTER_ORDER_OPTION,
    filter_empty: str = typer.Option("run", help="Filtered row: empty and full masks kept at most at the share of the generator's training patches ('run', as synthesize does) or of the study's own real tiles ('study'; they are picked nuclei first, so few or none are empty)."),
    val: int = typer.Option(50, help="Real validation tiles per label (from held-out source images, the same for every group)."),
    val_fraction: Optional[float] = typer.Option(None, help="Share of each label's source images held out for validation (default: the model's split, else 0.2)."),
    split_seed: Optional[int] = typer.Option(None, help="Seed of that split (default: the model's, else 0)."),
    seeds: int = typer.Option(3, help="Repeats with other real tiles, synthetic draws and nnU-Net initialisation: every cell is mean ± s.d., every difference to group I gets a 95 % paired bootstrap interval."),
    instances: Optional[Path] = typer.Option(None, help="Folder of instance masks (same stems) for AJI and PQ; default: the masks' own instance ids, or connected components of binary masks."),
    schedule: str = typer.Option("cpu", help="cpu: a small U-Net trained to its plateau on 2 cores (see README, 'Dice study'); full: nnU-Net's own plan and 1000 x 250 schedule (GPU)."),
    epochs: Optional[int] = typer.Option(None, help="Override the schedule's nnU-Net epochs (the same for every group)."),
    iterations: Optional[int] = typer.Option(None, help="Override the schedule's iterations per epoch."),
    batch_size: Optional[int] = typer.Option(None, help="nnU-Net batch size for every group (default: nnU-Net's planned batch, at most 12 with --schedule cpu)."),
    unet_features: int = typer.Option(16, help="--schedule cpu: U-Net features in the first stage, doubling per stage."),
    unet_max_features: int = typer.Option(512, help="--schedule cpu: cap on the U-Net's features per stage."),
    curve: bool = typer.Option(True, help="Learning curve (scores at 25/50/75/100 % of the schedule) of group I and the largest real + synthetic group: shows whether the schedule reaches its plateau."),
    model: Optional[Path] = typer.Option(None, help="Reuse a trained run; every validation image must be among its held-out images."),
    preset: Preset = typer.Option(Preset.cpu, help="Generator preset when no --model is given (trained on the real training pool only)."),
    out: Path = typer.Option(Path("pathar_benchmark"), help="Benchmark folder: nnU-Net data, models, caches and the report. Rerun to resume."),
    reference: Optional[Path] = typer.Option(None, help="A finished benchmark folder of the same data and settings but another generator (or sampling, filter, rows): its real-only folds (group I) are taken instead of trained again, and the report says so. Halves a study that compares one generator row with group I."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda ..."),
    quiet: bool = typer.Option(False, help="No progress bars."),
    classes: Optional[str] = typer.Option(None, help="Multi-class masks: the classes as name=id pairs, ids 0, 1, ... K-1 with 0 the background (default: binary). nnU-Net segments every class; the report adds the Dice of each class (dice_<class>)."),
    mask_mode: MaskMode = typer.Option(MaskMode.classes, help="classes: mask values are class ids (binary by default); border: --masks holds instance masks, segmented as background / interior / border and turned back into nuclei for AJI and PQ."),
) -> None:
    """Real + synthetic Dice scaling on nnU-Net v2 (paper Table IV): is the generator worth it?

    Groups, counts per label: I real only; II synthetic only; III-V real + 100 / 200 / 400 synthetic;
    plus, at the largest count, the pool's real masks re-rendered by the generator
    (mask-conditioned) and a classical baseline (the real tiles copied with dihedral transforms,
    elastic deformation and colour jitter). One nnU-Net is trained per group on all labels, with
    nnU-Net's own planner, preprocessor, trainer and predictor and the same schedule for every group;
    Dice is reported per label on a fixed real validation set of held-out source images. All cases
    live in one nnU-Net dataset, preprocessed once; each group is one fold of it.

    Reports Dice, AJI and PQ per label, mean ± s.d. over --seeds, and each group's difference to
    group I with a 95 % paired bootstrap interval. Writes dice_scaling.csv / .md / .png / .json and
    dice_scaling_curve.csv into --out. Interrupted runs resume; finished groups are never retrained.

    Multi-class masks (--classes, or --mask-mode border for instance masks): nnU-Net is trained on
    all K classes; Dice stays the nuclei against the background, each class gets its own Dice
    column, and a border study's AJI and PQ take the nuclei recovered from the border map.
    """
    from pathar_aug.mask_classes import parse_classes
    from pathar_aug.study import DEMO_DATA, BenchmarkSettings, run_benchmark

    if (images is None) != (masks is None):
        raise ValueError("give both --images and --masks, or neither (bundled demo data)")
    try:
        counts = tuple(int(s) for s in synthetic.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--synthetic must be comma-separated counts such as 0,100,200,400, got {synthetic!r}") from None
    settings = BenchmarkSettings(
        images=str(images or DEMO_DATA / "images"), masks=str(masks or DEMO_DATA / "masks"),
        labels_csv=str(labels) if labels else None, real=real, synthetic=counts, synthetic_only=synthetic_only,
        extra_rows=extra_rows, extra_kinds=tuple(k.strip() for k in extra_kinds.split(",") if k.strip()), unfiltered=unfiltered, filter_order=filter_order,
        filter_empty=filter_empty, val=val, val_fraction=val_fraction, split_seed=split_seed, seeds=seeds,
        schedule=schedule, epochs=epochs, iterations=iterations, batch_size=batch_size, unet_features=unet_features,
        unet_max_features=unet_max_features, curve=curve, instances=str(instances) if instances else None,
        model=str(model) if model else None, preset=preset.value,
        classes=parse_classes(classes).mapping() if classes is not None else None, mask_mode=mask_mode.value)
    paths = run_benchmark(settings, out, _device(device), reporter=_reporter(quiet), reference=reference)
    console.print(f"\n[bold green]done[/bold green]: table {paths['md']}")
    console.print(paths["md"].read_text(), markup=False, highlight=False)


# ------------------------------------------------------------------------------------ evaluate
@app.command()
@user_errors
def evaluate(
    model: Optional[Path] = typer.Option(None, help="A run folder made by `pathar-aug train`: samples --n pairs per label and adds the reference rows."),
    images: Optional[Path] = typer.Option(None, help="Real images (default: the folder the model was trained on)."),
    masks: Optional[Path] = typer.Option(None, help="Real masks with the same file stems."),
    labels: Optional[Path] = typer.Option(None, help="CSV 'name,label' (else subfolder names, else one label)."),
    synthetic: Optional[Path] = typer.Option(None, help="Judge pairs already written instead of sampling: an nnU-Net raw dataset (its synthetic cases) or a folder with images/ and masks/."),
    n: int = typer.Option(500, help="Generated pairs per label (and real training patches in the floor row)."),
    n_real: int = typer.Option(2000, help="At most this many real held-out patches per label in the reference (0 = all)."),
    features: Optional[list[str]] = typer.Option(None, "--features", help="Feature space, repeatable. "
                                                 "Default: style and colour-texture. Forms: see below."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: MODEL/evaluation): metrics.csv, metrics.md, scale_check.csv, grid_<label>.png."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder for generated sets, features, classifier, segmenter (default: OUT/cache)."),
    references: bool = typer.Option(True, "--references/--no-references", help="Add the floor, tokenizer-reconstruction and weak-baseline rows."),
    cfg: Optional[float] = CFG_OPTION,
    temperature: Optional[float] = TEMPERATURE_OPTION,
    top_k: Optional[int] = TOP_K_OPTION,
    top_p: Optional[float] = TOP_P_OPTION,
    seed: int = typer.Option(0, help="Seed for sampling and subsets: the same settings give the same numbers."),
    batch_size: int = BATCH_SIZE_OPTION,
    classifier_steps: Optional[int] = typer.Option(None, help="Style-classifier training steps (default 200)."),
    segmenter_steps: Optional[int] = typer.Option(None, help="Agreement-segmenter training steps (default 300)."),
    min_agreement: Optional[float] = typer.Option(None, help="The 'model, filtered' set keeps sampled pairs whose agreement with the run's quality filter reaches this Dice (default: the filter's own per-label threshold)."),
    filter_order: str = FILTER_ORDER_OPTION,
    kid_subsets: int = typer.Option(100, help="KID: number of random subsets."),
    lpips_weights: Optional[Path] = typer.Option(None, help="Local torchvision AlexNet weights for LPIPS (default: the torch hub cache, if there)."),
    lpips_linear: Optional[Path] = typer.Option(None, help="Local LPIPS v0.1 linear weights (alex.pth); without them LPIPS is the unweighted variant, named so."),
    patch_size: Optional[int] = typer.Option(None, help="Patch size without --model (default: the synthetic pairs' size)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Measure generation quality per label against real held-out patches; nothing is downloaded.

    Samples --n pairs per label from --model (or reads --synthetic pairs) and compares them with the
    run's held-out real images, tiled to the model's patch size. Every number is labelled with the
    feature space it was computed in: KID and FID (N stated), improved precision / recall, Style
    Score (a classifier trained on your real images), diversity (LPIPS only with local weights, else
    mean pairwise feature distance, named so), mask structure statistics against real masks, and
    image-mask Dice of a segmenter trained on real pairs.

    [bold]Scale rows[/bold] in the same tables: real held-out vs real training (the floor),
    tokenizer reconstructions, and a weak baseline (independent marginal tokens per label). A
    useful model sits between floor and weak baseline; scale_check.csv says where it does.

    [bold]Feature spaces[/bold] (--features, repeatable): style | colour-texture |
    timm:ARCH=PATH[,name=NAME,image_size=224,KEY=VALUE] (any timm model, local weights file) |
    dinov2:PATH | uni:PATH. No pretrained backbone is installable with its weights inside a package
    here (checked), so deep feature spaces need a weights file you already have.
    """
    from pathar_aug.evaluation import EvalConfig
    from pathar_aug.evaluation.run import evaluate_run
    from pathar_aug.evaluation.segmenter import SegmenterConfig
    from pathar_aug.evaluation.style_classifier import StyleClassifierConfig

    eval_cfg = EvalConfig(
        kid_subsets=kid_subsets, progress=not quiet, seed=seed, filter_min_agreement=min_agreement, filter_order=filter_order,
        style=StyleClassifierConfig(**({"steps": classifier_steps} if classifier_steps is not None else {})),
        segmenter=SegmenterConfig(**({"steps": segmenter_steps} if segmenter_steps is not None else {})),
    )
    sampling = sampling_config(cfg, temperature, top_k, top_p, seed, batch_size, model)
    reporter = _reporter(quiet)
    result = evaluate_run(model=model, images=images, masks=masks, labels_csv=labels, out=out, n=n,
                          features=features or (), synthetic=synthetic, sampling=sampling, n_real=n_real or None,
                          references=references, config=eval_cfg, patch_size=patch_size,
                          lpips_weights=lpips_weights, lpips_linear=lpips_linear, cache_dir=cache,
                          device=_device(device), reporter=reporter)
    check = result.scale
    if not check.empty:
        for label, g in check.groupby("label", sort=False):
            verdicts = ", ".join(f"{v}: {k}" for v, k in g["verdict"].value_counts().items())
            reporter.log(f"scale check {label}: {verdicts}")
    console.print(f"\n[bold green]done[/bold green]: {result.out_dir / 'metrics.md'} (CSV, grids and scale_check.csv beside it)")


for _command in app.registered_commands:
    _command.help = reflow(_command.help or inspect.getdoc(_command.callback) or "")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
