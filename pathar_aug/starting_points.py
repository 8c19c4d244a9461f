"""Starting points shipped with the package: finished runs, compact, for `train --init NAME`.

A few dozen tiles on a CPU cannot teach a tokenizer and a prior from scratch what nuclei look like;
a run trained on a public dataset can, and fine-tuning from it takes minutes. A starting point is a
run folder stripped to what generation and `--init` need, stored in half precision:

    pathar_aug/starting_points/NAME/
      run.json                 the run's settings and data summary (label names, held-out sources)
      tokenizer/tokenizer.pt   weights (float16), config, step
      prior/prior.pt           weights (float16), config, label names, step; prior_config.json
      filter/                  the run's quality filter (segmenter, thresholds)
      sampling.json            the run's sampling defaults
      starting_point.json      where it comes from, how it was trained, its held-out figures

Weights load into float32 models (``load_state_dict`` casts), so a starting point is used exactly
like a run folder: `train --init dsb2018`, or `synthesize --model <its folder>`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from pathar_aug.config import save_json
from pathar_aug.training import load_checkpoint, save_checkpoint, selected_weights

STARTING_POINTS_DIR = Path(__file__).resolve().parent / "starting_points"
ABOUT_FILE = "starting_point.json"
# what a run folder holds beyond the weights that generation and the filter need
_COPIED = ("prior/prior_config.json", "sampling.json")
_COPIED_DIRS = ("filter",)


class StartingPointError(ValueError):
    """An unknown starting point name, or a run that cannot be exported."""


def available() -> list[str]:
    """Names of the starting points inside the package."""
    if not STARTING_POINTS_DIR.is_dir():
        return []
    return sorted(p.name for p in STARTING_POINTS_DIR.iterdir() if (p / ABOUT_FILE).is_file())


def resolve(name_or_path: str | Path) -> Path:
    """A shipped starting point's folder by name (``dsb2018``), else the path as given."""
    text = str(name_or_path)
    if text in available():
        return STARTING_POINTS_DIR / text
    path = Path(text)
    if not path.exists() and "/" not in text and "\\" not in text:
        names = ", ".join(available()) or "none installed"
        raise StartingPointError(f"--init {text}: no such run folder and no shipped starting point of that name "
                                 f"(shipped: {names})")
    return path


def about(name: str) -> dict[str, Any]:
    """The shipped starting point's description: source, training settings, held-out figures."""
    return json.loads((resolve(name) / ABOUT_FILE).read_text())


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def _renamed(names: list[str], rename: dict[str, str]) -> list[str]:
    return [rename.get(n, n) for n in names]


def export(run_dir: str | Path, dest: str | Path, description: dict[str, Any],
           rename_labels: dict[str, str] | None = None) -> Path:
    """Write a finished run as a starting point: weights in float16 without optimizer states, the
    filter and sampling defaults copied, labels optionally renamed (``{"histology_stained":
    "histology"}``), and ``description`` (source, figures) as ``starting_point.json``. Replaces
    ``dest`` only once the new one is complete."""
    from pathar_aug.generator import load_generator
    from pathar_aug.pipeline import PRIOR_CKPT, TOKENIZER_CKPT, RunInfo

    run_dir, dest = Path(run_dir), Path(dest)
    rename = rename_labels or {}
    load_generator(run_dir, torch.device("cpu"))  # raises unless the run is finished
    info = RunInfo.load(run_dir)
    unknown = set(rename) - set(info.label_names)
    if unknown:
        raise StartingPointError(f"cannot rename labels {sorted(unknown)}: the run has {info.label_names}")
    building = dest.with_name(dest.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    for relative in (TOKENIZER_CKPT, PRIOR_CKPT):
        state = load_checkpoint(run_dir / relative)
        kept = {k: state[k] for k in ("config", "step", "label_names", "num_structure_codes",
                                      "num_appearance_codes", "grid") if k in state}
        if state.get("best"):  # the step of the weights exported
            kept["step"] = state["best"]["step"]
        kept["label_names"] = _renamed(list(state.get("label_names", info.label_names)), rename)
        (building / relative).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(building / relative, model=_half(selected_weights(state)), **kept)
    for relative in _COPIED:
        if (run_dir / relative).is_file():
            shutil.copy2(run_dir / relative, building / relative)
    for relative in _COPIED_DIRS:
        if (run_dir / relative).is_dir():
            shutil.copytree(run_dir / relative, building / relative)
    data = {**info.data, "label_names": _renamed(info.label_names, rename)}
    settings = info.settings.to_json()
    save_json({"settings": settings, "data": data}, building / "run.json")
    save_json({**description, "labels": data["label_names"], "label_renames": rename,
               "exported_from_settings": settings}, building / ABOUT_FILE)
    _rename_labels_in_files(building, rename)
    if dest.exists():
        shutil.rmtree(dest)
    building.rename(dest)
    return dest


def _rename_keys(value: Any, rename: dict[str, str]) -> Any:
    """Label names used as dict keys or list items, renamed throughout a JSON value."""
    if isinstance(value, dict):
        return {rename.get(k, k): _rename_keys(v, rename) for k, v in value.items()}
    if isinstance(value, list):
        return [_rename_keys(v, rename) for v in value]
    if isinstance(value, str):
        return rename.get(value, value)
    return value


def _rename_labels_in_files(folder: Path, rename: dict[str, str]) -> None:
    """The filter's and the sampling defaults' JSON files and the filter's checkpoint, labels renamed."""
    for path in [*(folder / "filter").glob("*.json"), folder / "sampling.json"]:
        if path.is_file():
            path.write_text(json.dumps(_rename_keys(json.loads(path.read_text()), rename), indent=2))
    for path in (folder / "filter").glob("*.pt"):
        state = load_checkpoint(path)
        if "label_names" in state:
            state["label_names"] = _renamed(list(state["label_names"]), rename)
            save_checkpoint(path, **state)
