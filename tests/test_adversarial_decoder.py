"""The image decoder's adversarial stage: what it trains, what it must leave alone, and how a
finished run gains it with --resume."""
from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from pathar_aug.adversarial_decoder import (
    AdversarialDecoderTrainer,
    PatchDiscriminator,
    adaptive_weight,
    discriminator_input,
    discriminator_loss,
)
from pathar_aug.cli import app
from pathar_aug.evaluation.texture import texture_figures
from pathar_aug.ingest import load_pairs
from pathar_aug.patches import make_patches
from pathar_aug.pipeline import RunError, RunInfo, apply_resume_options, make_settings
from pathar_aug.tokenizer import TOKENIZER_PRESETS, DualVQTokenizer, TokenizerConfig
from pathar_aug.train_tokenizer import load_tokenizer, train_tokenizer
from tests.conftest import disc_pair, train_tiny_run, write_pair_folders


def test_hinge_loss_is_zero_only_beyond_the_margins():
    far = discriminator_loss(torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -2.0))
    assert far.item() == 0.0
    # real scored 0 and fake scored 0: one margin missed on each side
    assert discriminator_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(2.0)
    assert discriminator_loss(torch.full((4,), 0.5), torch.full((4,), -1.0)).item() == pytest.approx(0.5)


def test_adaptive_weight_balances_the_gradients_at_the_last_layer():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g).requires_grad_(True)
    x = torch.randn(8, 3, generator=g) + 2.0
    rec = (x @ w.t()).abs().mean()
    gen = -(x @ w.t()).sum()  # gradients far above the 1e-4 that keeps the ratio finite
    weight = adaptive_weight(rec, gen, w)
    # a generator loss ten times larger gets a weight ten times smaller: the product pulls alike
    weight10 = adaptive_weight(rec, 10 * gen, w)
    assert weight10.item() == pytest.approx(weight.item() / 10, rel=1e-3)
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_gen = torch.autograd.grad(weight * gen, w)[0]
    assert g_gen.norm().item() == pytest.approx(g_rec.norm().item(), rel=1e-3)


def test_discriminator_scores_patches():
    scores = PatchDiscriminator(width=8)(torch.zeros(2, 3, 64, 64))
    assert scores.shape[:2] == (2, 1) and scores.shape[-1] > 1  # a score per patch, not per tile


def test_conditional_discriminator_reads_image_mask_and_label():
    x = torch.rand(3, 3, 8, 8)
    masks = (torch.rand(3, 1, 8, 8) > 0.5).float()
    labels = torch.tensor([2, 0, 2])
    seen = discriminator_input(x, masks, labels, num_labels=4)
    assert seen.shape == (3, 3 + 1 + 4, 8, 8)
    assert torch.equal(seen[:, :3], x) and torch.equal(seen[:, 3:4], masks)
    onehot = seen[:, 4:]
    assert torch.equal(onehot.amax(dim=(2, 3)), torch.eye(4)[labels])  # every pixel carries the label
    assert torch.equal(onehot.amin(dim=(2, 3)), torch.eye(4)[labels])
    assert discriminator_input(x, None, labels, num_labels=4) is x  # unconditioned: the image alone


def test_a_discriminator_of_the_other_conditioning_is_refused_on_resume():
    cfg = dataclasses.replace(TOKENIZER_PRESETS["tiny"], adversarial_steps=2, conditional_discriminator=True)
    plain_cfg = dataclasses.replace(cfg, conditional_discriminator=False)
    tok = DualVQTokenizer(cfg)
    conditional = AdversarialDecoderTrainer(tok, cfg, torch.device("cpu"), ["a", "b", "c"])
    assert conditional.discriminator.net[0].in_channels == 3 + 1 + 3
    plain = AdversarialDecoderTrainer(tok, plain_cfg, torch.device("cpu"), ["a", "b", "c"])
    assert plain.discriminator.net[0].in_channels == 3
    with pytest.raises(ValueError, match="conditional_discriminator"):
        plain.load_state_dict(conditional.state_dict())
    with pytest.raises(ValueError, match="label count"):
        AdversarialDecoderTrainer(tok, cfg, torch.device("cpu"), ["a", "b"]).load_state_dict(
            conditional.state_dict())


def test_unjudged_tiles_leave_the_gan_losses_alone():
    real, fake = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    only_first = torch.tensor([1.0, 0.0, 0.0])
    assert discriminator_loss(real, fake, only_first).item() == pytest.approx(
        discriminator_loss(real[:1], fake[:1]).item(), rel=1e-6)
    changed = real.clone()
    changed[1:] = 50.0  # what an unjudged tile scores does not count
    assert discriminator_loss(changed, fake, only_first).item() == pytest.approx(
        discriminator_loss(real, fake, only_first).item(), rel=1e-6)
    assert discriminator_loss(real, fake, torch.zeros(3)).item() == 0.0  # no judged tile: nothing


def _decoder_after_one_step(cfg: TokenizerConfig, labels: torch.Tensor) -> tuple[dict, dict, dict]:
    """Decoder and discriminator weights before and after one adversarial step of a fresh tiny
    tokenizer on a fixed batch (labels of ``["a", "b"]``)."""
    torch.manual_seed(0)
    tok = DualVQTokenizer(cfg)
    trainer = AdversarialDecoderTrainer(tok, cfg, torch.device("cpu"), ["a", "b"])
    rng = np.random.default_rng(0)
    pairs = [disc_pair(cfg.patch_size, rng) for _ in labels]
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None].to(torch.uint8)
    disc_before = {k: v.clone() for k, v in trainer.discriminator.state_dict().items()}
    torch.manual_seed(1)
    trainer.step(images, masks, labels, contextlib.nullcontext)
    return tok.image_decoder.state_dict(), disc_before, trainer.discriminator.state_dict()


def test_adversarial_labels_judge_only_their_tiles(one_thread):
    base = dataclasses.replace(TOKENIZER_PRESETS["tiny"], patch_size=32, adversarial_steps=1)
    selective = dataclasses.replace(base, adversarial_labels=("b",))
    l1_only = dataclasses.replace(base, adversarial_weight=0.0)
    only_a = torch.tensor([0, 0])
    # a batch without a "b" tile: the decoder steps on L1 alone and the discriminator learns nothing
    dec, disc_before, disc_after = _decoder_after_one_step(selective, only_a)
    dec_l1, _, _ = _decoder_after_one_step(l1_only, only_a)
    assert all(torch.allclose(dec[k], dec_l1[k], atol=1e-7) for k in dec)
    assert all(torch.equal(disc_before[k], disc_after[k]) for k in disc_before)
    # with a "b" tile the GAN term pulls the decoder and the discriminator trains
    with_b = torch.tensor([0, 1])
    dec, disc_before, disc_after = _decoder_after_one_step(selective, with_b)
    dec_l1, _, _ = _decoder_after_one_step(l1_only, with_b)
    assert not all(torch.allclose(dec[k], dec_l1[k], atol=1e-7) for k in dec)
    assert not all(torch.equal(disc_before[k], disc_after[k]) for k in disc_before)


def test_unknown_adversarial_labels_fail_before_any_training(tmp_path):
    with pytest.raises(ValueError, match="adversarial_labels"):
        TokenizerConfig(adversarial_labels="histology")  # a name, not a list of names
    images, masks = write_pair_folders(tmp_path / "data", n=4, size=32, labels=("a", "b"))
    patches = make_patches(load_pairs(images, masks), 32)
    cfg = dataclasses.replace(TOKENIZER_PRESETS["tiny"], adversarial_steps=2, adversarial_labels=("c",))
    with pytest.raises(ValueError, match=r"adversarial_labels names \['c'\].*'a', 'b'"):
        train_tokenizer(patches, tmp_path / "run", cfg, torch.device("cpu"), show_progress=False)
    assert not (tmp_path / "run" / "tokenizer.pt").exists()
    # a new run from the command line: refused before its run folder is written
    result = CliRunner().invoke(app, ["train", "--images", str(images), "--masks", str(masks), "--preset", "tiny",
                                      "--out", str(tmp_path / "cli_run"), "--adversarial-steps", "2",
                                      "--adversarial-labels", "a, c", "--quiet"])
    assert result.exit_code != 0 and "['c']" in result.output
    assert not (tmp_path / "cli_run" / "run.json").exists() and not (tmp_path / "cli_run" / "run_pending.json").exists()


def test_config_refuses_negative_adversarial_steps():
    with pytest.raises(ValueError, match="adversarial_steps"):
        TokenizerConfig(adversarial_steps=-1)
    assert dataclasses.replace(TOKENIZER_PRESETS["tiny"], adversarial_steps=5).total_steps == \
        TOKENIZER_PRESETS["tiny"].steps + 5


def test_stage_trains_the_image_decoder_alone_and_keeps_every_token(tmp_path, one_thread):
    images, masks = write_pair_folders(tmp_path / "data", n=6, size=32)
    patches = make_patches(load_pairs(images, masks), 32)
    cfg = dataclasses.replace(TOKENIZER_PRESETS["tiny"], steps=20, ckpt_every=10, log_every=2,
                              appearance_shuffle=0.5)
    device = torch.device("cpu")
    plain = load_tokenizer(train_tokenizer(patches, tmp_path / "run", cfg, device, show_progress=False))
    # conditional here (the CLI test below trains the default, unconditioned one)
    grown = dataclasses.replace(cfg, adversarial_steps=6, conditional_discriminator=True)
    ckpt = train_tokenizer(patches, tmp_path / "run", grown, device, resume=True, show_progress=False)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 26 and set(state["adversarial"]) == {
        "discriminator", "decoder_optimizer", "discriminator_optimizer"}
    # image, binary mask and label one-hot
    assert state["adversarial"]["discriminator"]["net.0.weight"].shape[1] == 3 + 1 + len(patches.label_names)
    sharp = load_tokenizer(ckpt)
    before, after = plain.state_dict(), sharp.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("image_decoder.", "fusion.")) for k in changed), sorted(changed)
    with torch.no_grad():
        s0, a0 = plain.encode(patches.images, patches.masks)
        s1, a1 = sharp.encode(patches.images, patches.masks)
        assert torch.equal(s0, s1) and torch.equal(a0, a1)  # the prior's tokens are untouched
        assert torch.equal(plain.decode_mask(s0), sharp.decode_mask(s1))
        assert not torch.equal(plain.decode_image(s0, a0), sharp.decode_image(s1, a1))
    rows = (tmp_path / "run" / "tokenizer_adversarial_loss.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [22, 24, 26]
    # a finished stage resumed with nothing more to do changes nothing
    train_tokenizer(patches, tmp_path / "run", grown, device, resume=True, show_progress=False)
    again = torch.load(ckpt, weights_only=False)
    assert again["step"] == 26 and all(torch.equal(again["model"][k], state["model"][k]) for k in state["model"])


def test_resume_may_grow_the_adversarial_steps_but_not_shrink_them(tmp_path):
    images, masks = write_pair_folders(tmp_path / "data", n=2, size=32)
    settings = make_settings(images, masks, None, "tiny", {"adversarial_steps": 4})
    logs: list[str] = []
    grown = apply_resume_options(tmp_path, settings, {"adversarial_steps": 10}, logs.append)
    assert grown.tokenizer.adversarial_steps == 10 and "prior, stay as they are" in logs[0]
    with pytest.raises(RunError, match="can only grow"):
        apply_resume_options(tmp_path, settings, {"adversarial_steps": 2}, logs.append)


def test_a_finished_run_gains_the_stage_with_resume_and_keeps_its_prior(tmp_path):
    run = train_tiny_run(tmp_path, "--tokenizer-steps", "6", "--prior-steps", "6")["run"]
    prior_before = torch.load(run / "prior" / "prior.pt", weights_only=False)
    tokens_before = (run / "tokens" / "train_tokens.pt").read_bytes()
    typo = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--adversarial-steps", "4",
                                    "--adversarial-labels", "brigth", "--quiet"])
    assert typo.exit_code != 0 and "brigth" in typo.output and "'bright', 'dark'" in typo.output
    assert RunInfo.load(run).settings.tokenizer.adversarial_steps == 0  # nothing stored, nothing trained
    result = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--adversarial-steps", "4",
                                      "--adversarial-labels", "bright", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "trains on adversarially to 4 steps" in result.output and "judges bright's tiles" in result.output
    assert RunInfo.load(run).settings.tokenizer.adversarial_labels == ("bright",)
    begun = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--adversarial-labels", "dark", "--quiet"])
    assert begun.exit_code != 0 and "has begun" in begun.output
    assert torch.load(run / "tokenizer" / "tokenizer.pt", weights_only=False)["step"] == 10
    prior_after = torch.load(run / "prior" / "prior.pt", weights_only=False)
    assert prior_after["step"] == prior_before["step"]
    assert all(torch.equal(prior_after["model"][k], v) for k, v in prior_before["model"].items())
    assert (run / "tokens" / "train_tokens.pt").read_bytes() == tokens_before
    assert RunInfo.load(run).settings.tokenizer.adversarial_steps == 4
    # the sampling defaults were chosen again with the new decoder
    assert json.loads((run / "sampling.json").read_text())["tokenizer_step"] == 10
    result = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--adversarial-steps", "2", "--quiet"])
    assert result.exit_code != 0 and "can only grow" in result.output


def test_texture_figures_tell_a_smooth_tile_from_a_textured_one():
    rng = np.random.default_rng(0)
    image, mask = disc_pair(64, rng)  # discs over a noisy background
    blurred = ndimage.gaussian_filter(image.astype(float), sigma=(2, 2, 0)).round().astype(np.uint8)
    smooth, textured = texture_figures([(blurred, mask)]), texture_figures([(image, mask)])
    assert textured.fine_detail > 2 * smooth.fine_detail
    assert textured.background_std > smooth.background_std
    assert textured.contrast < smooth.contrast  # the same nucleus, a noisier background
    empty = texture_figures([(blurred, np.zeros_like(mask))])
    assert empty.contrast_tiles == 0 and np.isnan(empty.contrast)


def test_a_weights_only_checkpoint_gains_the_stage_but_cannot_resume_its_own_steps(tmp_path, one_thread):
    """Runs trained elsewhere are often kept as weights only (no optimiser state)."""
    from pathar_aug.training import save_checkpoint

    images, masks = write_pair_folders(tmp_path / "data", n=4, size=32)
    patches = make_patches(load_pairs(images, masks), 32)
    cfg = dataclasses.replace(TOKENIZER_PRESETS["tiny"], steps=10)
    device = torch.device("cpu")
    ckpt = train_tokenizer(patches, tmp_path / "run", cfg, device, show_progress=False)
    state = torch.load(ckpt, weights_only=False)
    del state["optimizer"]
    save_checkpoint(ckpt, **state)
    with pytest.raises(ValueError, match="weights only"):
        train_tokenizer(patches, tmp_path / "run", dataclasses.replace(cfg, steps=12), device, resume=True,
                        show_progress=False)
    train_tokenizer(patches, tmp_path / "run", dataclasses.replace(cfg, adversarial_steps=3), device, resume=True,
                    show_progress=False)
    grown = torch.load(ckpt, weights_only=False)
    assert grown["step"] == 13 and "optimizer" not in grown and "adversarial" in grown
