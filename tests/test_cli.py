"""End-to-end CLI tests on the tiny preset with real files and real nnU-Net v2."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pathar_aug.cli import app, reflow
from tests.conftest import train_tiny_run

runner = CliRunner()


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny model trained once through the CLI on two labels of real PNG files."""
    return train_tiny_run(tmp_path_factory.mktemp("cli"))




def test_train_writes_a_complete_run_folder(trained):
    run = trained["run"]
    for rel in ("run.json", "tokenizer/tokenizer.pt", "tokenizer/tokenizer_loss.csv", "tokenizer/tokenizer_preview.png",
                "tokens/train_tokens.pt", "prior/prior.pt", "samples_preview.png"):
        assert (run / rel).is_file(), rel
    assert json.loads((run / "run.json").read_text())["data"]["label_names"] == ["bright", "dark"]
    again = runner.invoke(app, ["train", "--images", str(trained["images"]), "--masks", str(trained["masks"]),
                                "--preset", "tiny", "--out", str(run), "--quiet"])
    assert again.exit_code == 2 and "--resume" in again.output  # never silently overwrites a run
    resumed = runner.invoke(app, ["train", "--images", str(trained["images"]), "--masks", str(trained["masks"]),
                                  "--preset", "tiny", "--out", str(run), "--quiet", "--resume"])
    assert resumed.exit_code == 0, resumed.output


def test_end_to_end_import_synthesize_verify_preprocess_clean(trained, nnunet_dirs):
    from nnunet_integration.runner import plan_and_preprocess, verify
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    raw = nnunet_dirs["raw"]
    res = runner.invoke(app, ["import", "--images", str(trained["images"]), "--masks", str(trained["masks"]),
                              "--into", "Dataset501_Nuclei"])
    assert res.exit_code == 0, res.output
    dataset = raw / "Dataset501_Nuclei"
    real_files = snapshot(dataset)
    res = runner.invoke(app, ["synthesize", "--model", str(trained["run"]), "--into", "501", "--n", "4",
                              "--per-label", "--batch-size", "4", "--no-filter"])  # exact counts: unfiltered
    assert res.exit_code == 0, res.output
    dj = json.loads((dataset / "dataset.json").read_text())
    synthetic = [c for c in dj["dataset"] if c.startswith("pathar_")]
    assert len(synthetic) == 8 and dj["numTraining"] == 18
    after = snapshot(dataset)
    assert all(after[f] == h for f, h in real_files.items() if f != "dataset.json")  # real files byte-identical
    verify(dataset)  # nnU-Net's own integrity check
    identifier = plan_and_preprocess(501, num_processes=1, cpu_network=True)
    # nnU-Net's own split loading: every fold validates on real cases only and trains on all synthetic
    plans = json.loads((nnunet_dirs["preprocessed"] / dataset.name / f"{identifier}.json").read_text())
    for fold in range(5):
        plans["continue_training"] = False  # popped by nnUNetTrainer.__init__
        trainer = nnUNetTrainer(plans=plans, configuration="2d", fold=fold, dataset_json=dj,
                                device=__import__("torch").device("cpu"))
        train_keys, val_keys = trainer.do_split()
        assert val_keys and not any(k.startswith("pathar_") for k in val_keys)
        assert set(synthetic) <= set(train_keys)
    # the demo's closing summary and preview read the dataset back
    import numpy as np
    from PIL import Image

    from pathar_aug.demo import save_dataset_preview, summarize_dataset

    summary = summarize_dataset(dataset, pairs_per_label=3)
    assert {k: v.cases for k, v in summary.synthetic.items()} == {"bright": 4, "dark": 4}
    assert sum(v.cases for v in summary.real.values()) == 10
    empty = sum(int((np.asarray(Image.open(dataset / "labelsTr" / f"{c}.png")) > 0).mean() < 0.002)
                for c in synthetic)
    assert sum(v.empty for v in summary.synthetic.values()) == empty
    assert {k: len(v) for k, v in summary.synthetic_pairs.items()} == {"bright": 3, "dark": 3}
    preview = save_dataset_preview(summary.synthetic_pairs, dataset.parent / "preview.png")
    assert Image.open(preview).size[1] > 4 * 32  # two rows (image, mask) per label
    res = runner.invoke(app, ["clean", "--from", "501"])
    assert res.exit_code == 0, res.output
    assert snapshot(dataset) == real_files  # exactly the original dataset, byte for byte


def test_synthesize_into_fresh_dataset_and_mask_conditioned(trained, nnunet_dirs):
    from nnunet_integration.runner import verify

    res = runner.invoke(app, ["synthesize", "--model", str(trained["run"]), "--into", "502", "--n", "3",
                              "--label", "dark", "--masks-from", str(trained["masks"] / "dark")])
    assert res.exit_code == 0, res.output
    dataset = next(nnunet_dirs["raw"].glob("Dataset502_*"))
    verify(dataset)
    manifest = json.loads((dataset / "pathar_aug_manifest.json").read_text())
    (batch,) = manifest["batches"].values()
    assert batch["settings"]["mode"] == "mask-conditioned" and len(manifest["cases"]) == 3
    # the rendered pairs carry exactly the given masks
    from pathar_aug.ingest import read_mask
    from pathar_aug.generator import masks_as_patches

    given, _ = masks_as_patches(trained["masks"] / "dark", 32)
    written = sorted(dataset.glob("labelsTr/*.png"))
    assert len(written) == 3
    for i, path in enumerate(written):
        assert (read_mask(path) == given[i, 0].numpy()).all()


@pytest.mark.parametrize("case", ["n_zero", "unknown_label", "incomplete_model", "no_raw", "unknown_id",
                                  "bad_file_ending", "bad_channels", "both_label_flags"])
def test_bad_input_is_a_clear_error_and_writes_nothing(trained, nnunet_dirs, monkeypatch, tmp_path, case):
    raw = nnunet_dirs["raw"]
    existing = raw / "Dataset503_Existing"
    (existing / "imagesTr").mkdir(parents=True)
    (existing / "labelsTr").mkdir()
    dj = {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "nucleus": 1},
          "numTraining": 0, "file_ending": ".png"}
    if case == "bad_file_ending":
        dj["file_ending"] = ".jpg"  # lossy: no nnU-Net reader/writer takes it
    if case == "bad_channels":
        dj["channel_names"] = {"0": "gray"}
    (existing / "dataset.json").write_text(json.dumps(dj))
    model = trained["run"]
    if case == "incomplete_model":
        model = tmp_path / "half_run"
        model.mkdir()
        (model / "run.json").write_text((trained["run"] / "run.json").read_text())
    args = {"n_zero": ["--into", "504", "--n", "0"],
            "unknown_label": ["--into", "504", "--label", "nope"],
            "incomplete_model": ["--into", "504"],
            "no_raw": ["--into", "504"],
            "unknown_id": None,
            "bad_file_ending": ["--into", "503"],
            "bad_channels": ["--into", "503"],
            "both_label_flags": ["--into", "504", "--label", "dark", "--per-label"]}[case]
    if case == "no_raw":
        monkeypatch.delenv("nnUNet_raw")
    before = snapshot(tmp_path)
    if case == "unknown_id":
        res = runner.invoke(app, ["clean", "--from", "777"])
    else:
        res = runner.invoke(app, ["synthesize", "--model", str(model), "--n", "2", *args] if "--n" not in args
                            else ["synthesize", "--model", str(model), *args])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output
    expected = {"n_zero": "--n must be a positive", "unknown_label": "label 'nope' is unknown",
                "incomplete_model": "incomplete", "no_raw": "nnUNet_raw", "unknown_id": "777",
                "bad_file_ending": "file_ending", "bad_channels": "channel",
                "both_label_flags": "either --label or --per-label"}[case]
    assert expected in " ".join(res.output.split()), res.output
    assert snapshot(tmp_path) == before  # nothing written anywhere


def test_kill_during_synthesize_leaves_a_valid_dataset_and_rerun_completes(trained, nnunet_dirs):
    from nnunet_integration.runner import verify

    cmd = [sys.executable, "-m", "pathar_aug.cli", "synthesize", "--model", str(trained["run"]),
           "--into", "505", "--n", "400", "--batch-size", "4", "--device", "cpu", "--no-filter"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    manifest = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = list(nnunet_dirs["raw"].glob("Dataset505_*/pathar_aug_manifest.json"))
        if found:
            manifest = found[0]
            try:
                committed = sum(c["state"] == "committed" for c in json.loads(manifest.read_text())["cases"].values())
            except (json.JSONDecodeError, KeyError):
                committed = 0
            if committed >= 8:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "synthesize finished before it could be killed; raise --n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    dataset = manifest.parent
    dj = json.loads((dataset / "dataset.json").read_text())
    assert 0 < dj["numTraining"] < 400
    verify(dataset)  # nnU-Net accepts the half-written dataset
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    assert res.returncode == 0, res.stderr
    dj = json.loads((dataset / "dataset.json").read_text())
    assert dj["numTraining"] == 400 and len(list(dataset.glob("imagesTr/*.png"))) == 400
    verify(dataset)


def test_help_reads_as_a_manual():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for word in ("train", "synthesize", "import", "clean", "demo", "Typical session"):
        assert word in res.output
    res = runner.invoke(app, ["synthesize", "--help"])
    text = " ".join(res.output.split())
    assert "splits_final.json" in text and "real-only" in text.replace("real cases only", "real-only")


def test_help_paragraphs_wrap_to_the_terminal():
    # Typer's rich mode keeps a docstring's single line breaks; the CLI joins them (a narrow terminal
    # would otherwise break every source line twice) but keeps indented lines and list items
    text = "Summary.\n\nOne sentence\nwrapped here.\n  pathar-aug demo\n  pathar-aug train\n- item\n- item two\ngoes on"
    assert reflow(text) == ("Summary.\n\nOne sentence wrapped here.\n  pathar-aug demo\n  pathar-aug train\n"
                            "- item\n- item two goes on")
    for command in app.registered_commands:
        assert command.help and reflow(command.help) == command.help, command.name
    synthesize_help = next(c.help for c in app.registered_commands if c.callback.__name__ == "synthesize")
    assert "would join no fold. When that folder is known" in synthesize_help  # a line break in the source
