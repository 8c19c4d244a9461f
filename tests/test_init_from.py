"""`pathar-aug train --init RUN`: both stages start from another run's weights, labels matched by name."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pathar_aug.cli import app
from pathar_aug.config import from_preset
from pathar_aug import init_from
from pathar_aug.init_from import FIT_MASK_DICE, FIT_PSNR_MARGIN_DB, InitError, load_prior_weights, unfit_labels
from pathar_aug.prior import PRIOR_PRESETS, InterleavedPrior
from pathar_aug.train_tokenizer import INIT_FIT
from tests.conftest import train_tiny_run, write_pair_folders

runner = CliRunner()


@pytest.fixture(scope="module")
def start(tmp_path_factory, one_thread):
    """A finished tiny run on labels bright / dark: the starting point."""
    return train_tiny_run(tmp_path_factory.mktemp("init"), "--tokenizer-steps", "4", "--prior-steps", "4")


def test_prior_labels_are_matched_by_name_and_new_ones_start_from_the_mean(start):
    saved = torch.load(start["run"] / "prior" / "prior.pt", weights_only=False)
    assert saved["label_names"] == ["bright", "dark"]
    theirs = saved["model"]["label_emb.weight"]  # bright, dark, null
    prior = InterleavedPrior(from_preset(PRIOR_PRESETS, "tiny"), saved["num_structure_codes"],
                             saved["num_appearance_codes"], saved["grid"], 3)
    origin = load_prior_weights(prior, start["run"], ["dark", "new", "bright"])
    assert origin == {"dark": "kept", "new": "new", "bright": "kept"}
    ours = prior.label_emb.weight.detach()
    assert torch.equal(ours[0], theirs[1]) and torch.equal(ours[2], theirs[0])  # by name, not position
    assert torch.allclose(ours[1], theirs[:2].mean(dim=0))  # a new label: the mean of the known ones
    assert torch.equal(ours[3], theirs[2])  # the null label keeps its row
    assert torch.equal(prior.structure_emb.weight, saved["model"]["structure_emb.weight"])


def test_a_run_started_from_another(start, tmp_path):
    # new data with one known label (dark) and one new (other); tokenizer frozen
    images, masks = write_pair_folders(tmp_path / "data", n=8, size=64, labels=("dark", "other"), seed=3)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--images", str(images), "--masks", str(masks), "--preset", "tiny",
                              "--out", str(out), "--quiet", "--val-fraction", "0.2", "--prior-steps", "2",
                              "--init", str(start["run"]), "--init-tokenizer", "freeze"])
    assert res.exit_code == 0, res.output
    theirs = torch.load(start["run"] / "tokenizer" / "tokenizer.pt", weights_only=False)["model"]
    ours = torch.load(out / "tokenizer" / "tokenizer.pt", weights_only=False)["model"]
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)  # frozen: not one step trained
    prior = torch.load(out / "prior" / "prior.pt", weights_only=False)
    assert prior["label_names"] == ["dark", "other"] and prior["step"] == 2
    assert (out / "sampling.json").is_file() and (out / "filter" / "filter.json").is_file()

    # fine-tuned: the tokenizer starts from the run's weights and moves
    out2 = tmp_path / "run2"
    res = runner.invoke(app, ["train", "--images", str(images), "--masks", str(masks), "--preset", "tiny",
                              "--out", str(out2), "--quiet", "--val-fraction", "0.2", "--tokenizer-steps", "2",
                              "--prior-steps", "2", "--init", str(start["run"]), "--init-tokenizer", "finetune"])
    assert res.exit_code == 0, res.output
    tuned = torch.load(out2 / "tokenizer" / "tokenizer.pt", weights_only=False)
    assert tuned["step"] == 2 and not all(torch.equal(theirs[k], tuned["model"][k]) for k in theirs)
    assert not (out2 / "tokenizer" / INIT_FIT).exists()  # no fit measured when the mode is given


def test_unfit_labels_are_those_outside_either_limit():
    ok = {"psnr": 30.0, "baseline_psnr": 30.0 + FIT_PSNR_MARGIN_DB - 0.01, "mask_dice": FIT_MASK_DICE}
    blurry = {**ok, "baseline_psnr": 30.0 + FIT_PSNR_MARGIN_DB + 0.01}
    torn = {**ok, "mask_dice": FIT_MASK_DICE - 0.001}
    assert unfit_labels({"a": ok}) == []
    assert unfit_labels({"c": torn, "a": ok, "b": blurry}) == ["b", "c"]


def test_auto_fine_tunes_a_tokenizer_that_does_not_fit_and_freezes_one_that_does(start, tmp_path, monkeypatch):
    images, masks = write_pair_folders(tmp_path / "data", n=8, size=64, labels=("dark", "other"), seed=3)
    theirs = torch.load(start["run"] / "tokenizer" / "tokenizer.pt", weights_only=False)["model"]

    def train(out, *extra):
        res = runner.invoke(app, ["train", "--images", str(images), "--masks", str(masks), "--preset", "tiny",
                                  "--out", str(out), "--val-fraction", "0.2", "--tokenizer-steps", "2",
                                  "--prior-steps", "2", "--init", str(start["run"]), *extra])
        assert res.exit_code == 0, res.output
        fit = json.loads((out / "tokenizer" / INIT_FIT).read_text())
        tok = torch.load(out / "tokenizer" / "tokenizer.pt", weights_only=False)
        return " ".join(res.output.split()), fit, all(torch.equal(theirs[k], tok["model"][k]) for k in theirs)

    # the default; a tokenizer of 4 tiny steps reconstructs nothing well: fine-tuned
    output, fit, unchanged = train(tmp_path / "tuned")
    assert fit["mode"] == "finetune" and fit["unfit_labels"] and set(fit["labels"]) == {"dark", "other"}
    assert not unchanged and "fine-tuned" in output and "starting tokenizer on your tiles" in output
    assert all(r["patches"] >= 1 and r["baseline_psnr"] > 0 for r in fit["labels"].values())

    # limits it meets: kept frozen, not one step trained
    monkeypatch.setattr(init_from, "FIT_PSNR_MARGIN_DB", 1000.0)
    monkeypatch.setattr(init_from, "FIT_MASK_DICE", 0.0)
    output, fit, unchanged = train(tmp_path / "frozen", "--init-tokenizer", "auto")
    assert fit["mode"] == "freeze" and fit["unfit_labels"] == [] and unchanged and "kept frozen" in output


def test_init_from_another_architecture_or_no_run_is_refused(start, tmp_path):
    images, masks = write_pair_folders(tmp_path / "data", n=6, size=64, labels=("dark",), seed=4)
    res = runner.invoke(app, ["train", "--images", str(images), "--masks", str(masks), "--preset", "tiny",
                              "--out", str(tmp_path / "a"), "--quiet", "--init", str(tmp_path)])
    assert res.exit_code == 2 and "not a finished pathar-aug run folder" in " ".join(res.output.split())
    prior = InterleavedPrior(from_preset(PRIOR_PRESETS, "tiny", n_embd=48), 32, 32, (8, 8), 1)
    with pytest.raises(InitError, match="n_embd"):
        load_prior_weights(prior, start["run"], ["dark"])


def test_a_prior_trained_on_chooses_its_sampling_defaults_again(start, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(start["run"], run)
    assert json.loads((run / "sampling.json").read_text())["prior_step"] == 4
    res = runner.invoke(app, ["train", "--out", str(run), "--resume", "--prior-steps", "6", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "sampling.json").read_text())["prior_step"] == 6


def test_sampling_defaults_chosen_on_fewer_samples_are_chosen_again(start, tmp_path):
    import shutil

    from pathar_aug.sampling_defaults import SAMPLES_PER_LABEL

    run = tmp_path / "run"
    shutil.copytree(start["run"], run)
    path = run / "sampling.json"
    chosen = json.loads(path.read_text())
    assert chosen["samples_per_label"] == SAMPLES_PER_LABEL["tiny"]
    written = path.stat().st_mtime_ns
    res = runner.invoke(app, ["train", "--out", str(run), "--resume", "--quiet"])
    assert res.exit_code == 0, res.output
    assert path.stat().st_mtime_ns == written  # chosen on as many samples already: kept
    path.write_text(json.dumps({**chosen, "samples_per_label": 1}))  # as by a version that sampled fewer
    res = runner.invoke(app, ["train", "--out", str(run), "--resume", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads(path.read_text())["samples_per_label"] == SAMPLES_PER_LABEL["tiny"]


def test_export_a_starting_point_and_start_from_it(start, tmp_path, nnunet_dirs):
    from pathar_aug import starting_points

    dest = tmp_path / "points" / "mine"
    starting_points.export(start["run"], dest, {"source": "tiny test run"}, rename_labels={"dark": "darkfield"})
    tok = torch.load(dest / "tokenizer" / "tokenizer.pt", weights_only=False)
    prior = torch.load(dest / "prior" / "prior.pt", weights_only=False)
    assert "optimizer" not in tok and "optimizer" not in prior  # weights only
    assert all(v.dtype == torch.float16 for v in prior["model"].values() if v.is_floating_point())
    assert prior["label_names"] == ["bright", "darkfield"]
    assert (dest / "filter" / "filter.json").is_file() and (dest / "sampling.json").is_file()
    filter_labels = json.loads((dest / "filter" / "filter.json").read_text())["labels"]
    assert set(filter_labels) == {"bright", "darkfield"}
    about = json.loads((dest / starting_points.ABOUT_FILE).read_text())
    assert about["source"] == "tiny test run" and about["labels"] == ["bright", "darkfield"]
    original = torch.load(start["run"] / "prior" / "prior.pt", weights_only=False)["model"]
    assert all(torch.allclose(prior["model"][k].float(), original[k].float(), atol=1e-2, rtol=1e-2) for k in original)

    # a starting point is a run folder: it synthesizes as it is, through its own filter
    res = runner.invoke(app, ["synthesize", "--model", str(dest), "--into", "601", "--n", "2", "--label",
                              "darkfield", "--oversample", "10", "--min-agreement", "0"])
    assert res.exit_code == 0, res.output
    manifest = json.loads(next(nnunet_dirs["raw"].glob("Dataset601_*/pathar_aug_manifest.json")).read_text())
    assert len(manifest["cases"]) == 2 and all("scores" in c for c in manifest["cases"].values())

    # a new run on labels darkfield (known under its new name) and bright starts from it
    images, masks = write_pair_folders(tmp_path / "data", n=8, size=64, labels=("bright", "darkfield"), seed=5)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--images", str(images), "--masks", str(masks), "--preset", "tiny",
                              "--out", str(out), "--quiet", "--val-fraction", "0.2", "--prior-steps", "2",
                              "--init", str(dest), "--init-tokenizer", "freeze"])
    assert res.exit_code == 0, res.output
    ours = torch.load(out / "prior" / "prior.pt", weights_only=False)
    assert ours["label_names"] == ["bright", "darkfield"] and ours["step"] == 2


def test_an_unknown_starting_point_name_is_refused(tmp_path):
    images, masks = write_pair_folders(tmp_path / "data", n=6, size=64, labels=("dark",), seed=4)
    res = runner.invoke(app, ["train", "--images", str(images), "--masks", str(masks), "--preset", "tiny",
                              "--out", str(tmp_path / "a"), "--quiet", "--init", "nosuchpoint"])
    assert res.exit_code == 2
    assert "no shipped starting point of that name" in " ".join(res.output.split())
    assert not (tmp_path / "a").exists()  # refused before anything is written


def test_the_shipped_dsb2018_starting_point_loads_into_the_cpu_preset():
    from pathar_aug import starting_points
    from pathar_aug.init_from import load_tokenizer_weights
    from pathar_aug.tokenizer import TOKENIZER_PRESETS, DualVQTokenizer

    assert "dsb2018" in starting_points.available()
    folder = starting_points.resolve("dsb2018")
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 16 * 2**20
    about = starting_points.about("dsb2018")
    assert about["preset"] == "cpu" and about["labels"] == ["brightfield", "fluorescence", "histology"]
    assert about["heldout"]["tokenizer"]["fluorescence"]["mask_dice"] > 0.9
    tokenizer = DualVQTokenizer(from_preset(TOKENIZER_PRESETS, "cpu"))
    load_tokenizer_weights(tokenizer, "dsb2018")
    saved = torch.load(folder / "prior" / "prior.pt", weights_only=False)
    prior = InterleavedPrior(from_preset(PRIOR_PRESETS, "cpu"), saved["num_structure_codes"],
                             saved["num_appearance_codes"], saved["grid"], 2)
    assert load_prior_weights(prior, "dsb2018", ["fluorescence", "phase"]) == {"fluorescence": "kept", "phase": "new"}


def test_the_shipped_tokenizer_fits_the_bundled_images_and_not_unlike_ones(one_thread):
    # real images of DSB2018's modalities: within the limits; the same tiles with colours permuted
    # and inverted (an appearance it never saw): outside them, so "auto" fine-tunes
    from pathar_aug.ingest import load_pairs
    from pathar_aug.init_from import load_tokenizer_weights, tokenizer_fit
    from pathar_aug.patches import make_patches
    from pathar_aug.tokenizer import TOKENIZER_PRESETS, DualVQTokenizer
    from tests.conftest import DEMO

    patches = make_patches(load_pairs(DEMO / "images", DEMO / "masks"), 128)
    patches = patches.subset(list(range(0, len(patches), 4)))  # every label, a quarter of the tiles: quick
    tokenizer = DualVQTokenizer(from_preset(TOKENIZER_PRESETS, "cpu"))
    load_tokenizer_weights(tokenizer, "dsb2018")
    fit = tokenizer_fit(tokenizer, patches, torch.device("cpu"))
    assert fit["mode"] == "freeze" and set(fit["labels"]) == set(patches.label_names)
    patches.images = 255 - patches.images[:, [2, 0, 1]]
    unlike = tokenizer_fit(tokenizer, patches, torch.device("cpu"))
    assert unlike["mode"] == "finetune" and unlike["unfit_labels"]
