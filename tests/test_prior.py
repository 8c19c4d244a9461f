"""Interleaved prior: 2D RoPE, asymmetric mask, KV-cache equivalence, training and resume."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from pathar_aug.attention_mask import (
    cache_slots,
    interleaved_mask,
    sequence_length,
    step_key_range,
    step_mask,
)
from pathar_aug.config import from_preset
from pathar_aug.prior import PRIOR_PRESETS, InterleavedPrior
from pathar_aug.rope import apply_rotary, grid_positions, rope_tables
from pathar_aug.train_prior import load_prior, load_token_cache, train_prior

from tests.conftest import GRID, K_A, K_S, LABELS, N


pytestmark = pytest.mark.usefixtures("one_thread")


def make_prior(seed: int = 0, **overrides) -> InterleavedPrior:
    torch.manual_seed(seed)
    cfg = from_preset(PRIOR_PRESETS, "tiny", **overrides)
    return InterleavedPrior(cfg, K_S, K_A, GRID, LABELS).eval()


def random_tokens(batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    S = torch.randint(K_S, (batch, N), generator=g)
    A = torch.randint(K_A, (batch, N), generator=g)
    y = torch.randint(LABELS, (batch,), generator=g)
    return S, A, y


# ----- 2D RoPE ---------------------------------------------------------------------------------
def test_rope_pairs_share_position_and_cls_is_identity():
    cos, sin = rope_tables(GRID, head_dim=16)
    assert cos.shape == sin.shape == (sequence_length(N), 16)
    assert torch.equal(cos[0], torch.ones(16)) and torch.equal(sin[0], torch.zeros(16))
    for i in range(1, N + 1):  # s_i at 2i-1 and ā_i at 2i: same rotation
        assert torch.equal(cos[2 * i - 1], cos[2 * i]) and torch.equal(sin[2 * i - 1], sin[2 * i])
    # ...and different locations get different rotations
    distinct = {tuple(sin[2 * i].tolist()) for i in range(1, N + 1)}
    assert len(distinct) == N
    x = torch.randn(2, 1, 16)
    assert torch.equal(apply_rotary(x, cos[:1], sin[:1]), x)  # CLS unrotated, not zeroed


def test_rope_half_the_dims_follow_row_half_follow_column():
    head_dim = 16
    cos, _ = rope_tables(GRID, head_dim)
    rows, cols = grid_positions(GRID)
    pair = torch.arange(head_dim) % (head_dim // 2)  # dims d and d + head_dim/2 form one pair
    row_dims, col_dims = pair < head_dim // 4, pair >= head_dim // 4
    assert row_dims.sum() == col_dims.sum() == head_dim // 2
    for i in range(N):
        for j in range(N):
            c_i, c_j = cos[2 * i + 1], cos[2 * j + 1]
            assert torch.equal(c_i[row_dims], c_j[row_dims]) == bool(rows[i] == rows[j])
            assert torch.equal(c_i[col_dims], c_j[col_dims]) == bool(cols[i] == cols[j])


def test_rope_scores_depend_on_relative_2d_offset_only():
    cos, sin = rope_tables((5, 5), head_dim=16)
    q, k = torch.randn(16), torch.randn(16)

    def score(loc_q: int, loc_k: int) -> torch.Tensor:
        pq, pk = 2 * loc_q + 1, 2 * loc_k + 1
        rq = apply_rotary(q[None], cos[pq:pq + 1], sin[pq:pq + 1])
        rk = apply_rotary(k[None], cos[pk:pk + 1], sin[pk:pk + 1])
        return (rq * rk).sum()

    # (0,0)->(1,2) and (2,1)->(3,3) have the same offset; (0,0)->(2,1) does not
    assert torch.allclose(score(0, 7), score(11, 18), atol=1e-5)
    assert not torch.allclose(score(0, 7), score(0, 11), atol=1e-3)


# ----- asymmetric mask -------------------------------------------------------------------------
def spec_visible(n: int) -> torch.Tensor:
    """The visibility rules written out position by position."""
    t = sequence_length(n)
    kind = ["cls"] + ["s", "a"] * n
    loc = [0] + [i for i in range(1, n + 1) for _ in range(2)]
    m = torch.zeros(t, t, dtype=torch.bool)
    for q in range(t):
        for k in range(t):
            if kind[q] == "cls":
                m[q, k] = k == 0
            elif kind[q] == "s":
                m[q, k] = kind[k] == "cls" or (kind[k] == "s" and loc[k] <= loc[q])
            else:
                m[q, k] = kind[k] == "cls" or (kind[k] in ("s", "a") and loc[k] <= loc[q])
    return m


@pytest.mark.parametrize("n", [1, 4, N])
def test_mask_rows_as_specified(n):
    mask = interleaved_mask(n)
    assert mask.dtype == torch.bool and mask.shape == (2 * n + 1, 2 * n + 1)
    assert torch.equal(mask, spec_visible(n))
    assert mask.diagonal().all()  # every row sees itself...
    assert mask.any(dim=1).all()  # ...so no row is fully masked
    s_rows, a_cols = torch.arange(1, 2 * n + 1, 2), torch.arange(2, 2 * n + 1, 2)
    assert not mask[s_rows][:, a_cols].any()  # structure never sees appearance
    assert mask[0].sum() == 1  # CLS sees only itself


def test_cache_slice_and_step_mask_reproduce_mask_rows():
    n = 5
    mask, slots, smask = interleaved_mask(n), cache_slots(n), step_mask(n)
    assert sorted(slots.tolist()) == list(range(2 * n + 1))  # a permutation of the slots
    for i in range(1, n + 1):
        lo, hi = step_key_range(i, n)
        for row, pos in enumerate((2 * i - 1, 2 * i)):
            seen = {p for p in range(2 * n + 1) if lo <= slots[p] < hi and smask[row, slots[p]]}
            assert seen == set(mask[pos].nonzero().flatten().tolist())
    lo, hi = step_key_range(0, n)
    assert [p for p in range(2 * n + 1) if lo <= slots[p] < hi] == [0]  # step 0: CLS alone


# ----- model -----------------------------------------------------------------------------------
def test_forward_shapes_and_loss_is_mean_token_nll():
    prior = make_prior()
    S, A, y = random_tokens(3)
    s_logits, a_logits = prior(S, A, y)
    assert s_logits.shape == (3, N, K_S) and a_logits.shape == (3, N, K_A)
    s_nll, a_nll = prior.loss(S.view(3, *GRID), A.view(3, *GRID), y)  # grids are flattened raster-wise
    ref_s = -s_logits.log_softmax(-1).gather(-1, S[..., None]).mean()
    ref_a = -a_logits.log_softmax(-1).gather(-1, A[..., None]).mean()
    assert torch.allclose(s_nll, ref_s, atol=1e-6) and torch.allclose(a_nll, ref_a, atol=1e-6)


def test_structure_logits_do_not_change_when_appearance_changes():
    prior = make_prior()
    S, A, y = random_tokens(4)
    s_ref, a_ref = prior(S, A, y)
    for loc in (0, N // 2, N - 1):
        A2 = A.clone()
        A2[:, loc] = (A2[:, loc] + 1) % K_A
        s2, a2 = prior(S, A2, y)
        assert torch.equal(s2, s_ref)
        # control: appearance predicted after loc does change (the input is not ignored)
        assert not torch.allclose(a2[:, loc + 1:], a_ref[:, loc + 1:]) or loc == N - 1
    s3, _ = prior(S, torch.randint(K_A, A.shape), y)
    assert torch.equal(s3, s_ref)


def test_structure_stream_is_causal():
    prior = make_prior()
    S, A, y = random_tokens(2)
    s_ref, a_ref = prior(S, A, y)
    j = 5  # change s_{j+1} (index j): logits for s_1..s_{j+1} and a_1..a_j are untouched
    S2 = S.clone()
    S2[:, j] = (S2[:, j] + 1) % K_S
    s2, a2 = prior(S2, A, y)
    assert torch.allclose(s2[:, : j + 1], s_ref[:, : j + 1], atol=1e-6)
    assert not torch.allclose(s2[:, j + 1:], s_ref[:, j + 1:])
    assert torch.allclose(a2[:, :j], a_ref[:, :j], atol=1e-6)
    assert not torch.allclose(a2[:, j], a_ref[:, j])  # a_{j+1} sees s_{j+1}


def test_cached_step_decoding_matches_teacher_forced_forward():
    prior = make_prior()
    S, A, y = random_tokens(3)
    with torch.inference_mode():
        s_ref, a_ref = prior(S, A, y)
        cache = prior.new_cache(3)
        s_steps = [prior.start(cache, y)]
        a_steps = []
        a_prev = torch.full((3,), prior.appearance_start)
        for i in range(1, N + 1):
            s_logits, a_logits = prior.step(cache, i, S[:, i - 1], a_prev)
            s_steps.append(s_logits)
            a_steps.append(a_logits)
            a_prev = A[:, i - 1]
    assert torch.allclose(torch.stack(s_steps[:N], 1), s_ref, atol=1e-5)
    assert torch.allclose(torch.stack(a_steps, 1), a_ref, atol=1e-5)
    # the no-cache prefix recomputation agrees too
    i = 7
    s_pre, a_pre = prior.prefix_logits(y, S[:, :i], prior._shift_appearance(A)[:, :i])
    assert torch.allclose(s_pre, s_ref[:, i], atol=1e-5) and torch.allclose(a_pre, a_ref[:, i - 1], atol=1e-5)


def test_label_dropout_uses_null_label():
    prior = make_prior(label_dropout=1.0)
    S, A, y = random_tokens(3)
    null = torch.full_like(y, prior.null_label)
    with torch.no_grad():
        s_null, a_null = prior(S, A, null)  # eval: labels used as given
        s_cond, _ = prior(S, A, y)
        prior.train()  # dropout 0 in the tiny preset, so only the labels differ
        s_drop, a_drop = prior(S, A, y)
    assert prior.null_label == LABELS
    assert not torch.allclose(s_cond, s_null)
    assert torch.allclose(s_drop, s_null, atol=1e-6) and torch.allclose(a_drop, a_null, atol=1e-6)
    prior.cfg.label_dropout = 0.0
    with torch.no_grad():
        assert torch.allclose(prior(S, A, y)[0], s_cond, atol=1e-6)


# ----- training --------------------------------------------------------------------------------
def write_cache(path, m: int = 24, seed: int = 0) -> None:
    """Random but learnable tokens: each sample is one of two random templates of its label."""
    g = torch.Generator().manual_seed(seed)
    templates_s = torch.randint(K_S, (LABELS, 2, *GRID), generator=g)
    templates_a = torch.randint(K_A, (LABELS, 2, *GRID), generator=g)
    labels = torch.randint(LABELS, (m,), generator=g)
    which = torch.randint(2, (m,), generator=g)
    torch.save(
        {
            "structure": templates_s[labels, which], "appearance": templates_a[labels, which],
            "labels": labels, "label_names": ["he", "ihc", "if"],
            "num_structure_codes": K_S, "num_appearance_codes": K_A,
        },
        path,
    )


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def tiny_cfg(**overrides):
    return from_preset(PRIOR_PRESETS, "tiny", **overrides)


def test_train_prior_reduces_loss_resumes_and_reports_heldout(tmp_path):
    tokens, heldout = tmp_path / "tokens.pt", tmp_path / "heldout.pt"
    write_cache(tokens)
    write_cache(heldout, m=8, seed=0)
    out = tmp_path / "run"
    ckpt = train_prior(tokens, out, tiny_cfg(steps=40), "cpu", resume=False, progress=False)
    rows = read_csv(out / "prior_loss.csv")
    assert [int(r["step"]) for r in rows] == list(range(5, 41, 5))
    first = float(rows[0]["structure_nll"]) + float(rows[0]["appearance_nll"])
    last = float(rows[-1]["structure_nll"]) + float(rows[-1]["appearance_nll"])
    assert last < 0.7 * first
    assert torch.load(ckpt, weights_only=False)["step"] == 40

    # resume to 60 steps: the step continues and the CSV gains rows without duplicates
    ckpt = train_prior(tokens, out, tiny_cfg(steps=60), "cpu", resume=True,
                       heldout_tokens_path=heldout, progress=False)
    steps = [int(r["step"]) for r in read_csv(out / "prior_loss.csv")]
    assert steps == list(range(5, 61, 5))
    saved = torch.load(ckpt, weights_only=False)
    assert saved["step"] == 60 and saved["label_names"] == ["he", "ihc", "if"] and saved["grid"] == list(GRID)
    result = json.loads((out / "prior_heldout_nll.json").read_text())
    assert result["step"] == 60 and result["num_samples"] == 8
    assert 0 < result["structure_nll"] < torch.log(torch.tensor(float(K_S)))  # better than uniform

    prior = load_prior(ckpt, "cpu")
    assert not prior.training and prior.label_names == ["he", "ihc", "if"] and prior.grid == GRID


def test_resume_equals_uninterrupted_training(tmp_path):
    tokens = tmp_path / "tokens.pt"
    write_cache(tokens)
    cfg = dict(cosine=False, ckpt_every=10, label_dropout=0.5)  # constant lr: same schedule either way
    straight = train_prior(tokens, tmp_path / "a", tiny_cfg(steps=20, **cfg), "cpu", progress=False)
    train_prior(tokens, tmp_path / "b", tiny_cfg(steps=10, **cfg), "cpu", progress=False)
    resumed = train_prior(tokens, tmp_path / "b", tiny_cfg(steps=20, **cfg), "cpu", resume=True, progress=False)
    a = torch.load(straight, weights_only=False)["model"]
    b = torch.load(resumed, weights_only=False)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # a fresh (non-resumed) run into the same folder starts again at step 0
    train_prior(tokens, tmp_path / "b", tiny_cfg(steps=5, **cfg), "cpu", resume=False, progress=False)
    assert [int(r["step"]) for r in read_csv(tmp_path / "b" / "prior_loss.csv")] == [5]


def test_resume_rejects_other_architecture(tmp_path):
    tokens = tmp_path / "tokens.pt"
    write_cache(tokens)
    train_prior(tokens, tmp_path / "r", tiny_cfg(steps=2), "cpu", progress=False)
    with pytest.raises(ValueError, match="n_embd"):
        train_prior(tokens, tmp_path / "r", tiny_cfg(steps=4, n_embd=48), "cpu", resume=True, progress=False)


def test_load_token_cache_validates(tmp_path):
    good = tmp_path / "good.pt"
    write_cache(good)
    assert load_token_cache(good)["structure"].shape[1:] == GRID
    data = torch.load(good)
    data["appearance"][0, 0, 0] = K_A  # out of vocabulary
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="appearance"):
        load_token_cache(tmp_path / "bad.pt")
    del data["labels"]
    torch.save(data, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="labels"):
        load_token_cache(tmp_path / "missing.pt")


def test_heldout_curve_against_steps_and_minutes_and_balanced_batches(tmp_path, monkeypatch):
    tokens, heldout = tmp_path / "tokens.pt", tmp_path / "heldout.pt"
    write_cache(tokens, m=40)
    write_cache(heldout, m=8, seed=0)
    out = tmp_path / "run"
    cfg = tiny_cfg(steps=20, eval_every=10, eval_sequences=4)
    train_prior(tokens, out, cfg, "cpu", heldout_tokens_path=heldout, progress=False)
    curve = read_csv(out / "prior_heldout_curve.csv")
    assert [int(r["step"]) for r in curve] == [10, 20]
    assert all(float(r["heldout_structure_nll"]) > 0 and float(r["minutes"]) >= 0 for r in curve)
    assert float(curve[1]["minutes"]) >= float(curve[0]["minutes"])
    # resumed: the curve goes on from the checkpoint, the minutes keep counting
    train_prior(tokens, out, tiny_cfg(steps=30, eval_every=10, eval_sequences=4), "cpu", resume=True,
                heldout_tokens_path=heldout, progress=False)
    curve = read_csv(out / "prior_heldout_curve.csv")
    assert [int(r["step"]) for r in curve] == [10, 20, 30]
    assert float(curve[2]["minutes"]) >= float(curve[1]["minutes"])

    # label-balanced batches: a label with 1 of 40 sequences is drawn about a third of the time
    labels = torch.zeros(40, dtype=torch.long)
    labels[0] = 1
    drawn = []
    real_multinomial = torch.multinomial

    def spy(weights, n, replacement=False, generator=None):
        idx = real_multinomial(weights, n, replacement=replacement, generator=generator)
        drawn.append(idx)
        return idx

    data = torch.load(tokens, weights_only=False)
    torch.save({**data, "labels": labels}, tokens)
    monkeypatch.setattr(torch, "multinomial", spy)
    train_prior(tokens, tmp_path / "balanced", tiny_cfg(steps=50, batch_size=8), "cpu", progress=False)
    share = float((labels[torch.cat(drawn)] == 1).float().mean())
    assert 0.3 < share < 0.7  # uniform sampling would give 1/40


def test_prior_keeps_the_weights_of_the_lowest_heldout_point(tmp_path):
    # held-out templates unlike the training ones: the prior learns the token marginals first,
    # then memorises the training templates and the held-out NLL climbs (a real overfit, not staged)
    tokens, heldout, out = tmp_path / "tokens.pt", tmp_path / "heldout.pt", tmp_path / "run"
    write_cache(tokens, m=24, seed=0)
    write_cache(heldout, m=8, seed=1)
    cfg = tiny_cfg(steps=40, eval_every=5, eval_sequences=8)
    train_prior(tokens, out, cfg, "cpu", heldout_tokens_path=heldout, progress=False)

    curve = read_csv(out / "prior_heldout_curve.csv")
    totals = {int(r["step"]): float(r["heldout_structure_nll"]) + float(r["heldout_appearance_nll"]) for r in curve}
    lowest = min(totals, key=totals.get)
    assert lowest < 40 and totals[40] > totals[lowest] + 0.05  # the case this is for
    saved = torch.load(out / "prior.pt", weights_only=False)
    assert saved["step"] == 40 and saved["best"]["step"] == lowest  # resume point: the last step
    prior = load_prior(out / "prior.pt", "cpu")  # samples with the lowest point's weights
    for name, value in prior.state_dict().items():
        assert torch.equal(value, saved["best"]["model"][name])
    assert any(not torch.equal(v, saved["best"]["model"][k]) for k, v in saved["model"].items())
    figure = json.loads((out / "prior_heldout_nll.json").read_text())
    assert (figure["step"], figure["last_step"]) == (lowest, 40)
    assert figure["total_nll"] == pytest.approx(totals[lowest], rel=1e-4)  # the curve's subset is the whole cache

    # resumed further: a later point replaces the kept one only when lower, the last step goes on
    train_prior(tokens, out, tiny_cfg(steps=50, eval_every=5, eval_sequences=8), "cpu", resume=True,
                heldout_tokens_path=heldout, progress=False)
    saved = torch.load(out / "prior.pt", weights_only=False)
    totals = {int(r["step"]): float(r["heldout_structure_nll"]) + float(r["heldout_appearance_nll"])
              for r in read_csv(out / "prior_heldout_curve.csv")}
    assert saved["step"] == 50 and saved["best"]["step"] == min(totals, key=totals.get)

    # keep_best off: the last step's weights, as before
    train_prior(tokens, tmp_path / "last", tiny_cfg(steps=20, eval_every=5, eval_sequences=8, keep_best=False),
                "cpu", heldout_tokens_path=heldout, progress=False)
    assert "best" not in torch.load(tmp_path / "last" / "prior.pt", weights_only=False)


def test_a_finished_weights_only_checkpoint_is_left_alone_and_an_unfinished_one_refused(tmp_path):
    """Runs trained elsewhere are often kept as weights only (no optimiser or random states)."""
    from pathar_aug.training import save_checkpoint

    tokens = tmp_path / "tokens.pt"
    write_cache(tokens)
    ckpt = train_prior(tokens, tmp_path / "r", tiny_cfg(steps=4), "cpu", progress=False)
    slim = {k: v for k, v in torch.load(ckpt, weights_only=False).items()
            if k not in ("optimizer", "batch_rng", "torch_rng")}
    save_checkpoint(ckpt, **slim)
    before = ckpt.read_bytes()
    train_prior(tokens, tmp_path / "r", tiny_cfg(steps=4), "cpu", resume=True, progress=False)
    assert ckpt.read_bytes() == before  # finished: nothing trained, nothing rewritten
    with pytest.raises(ValueError, match="weights only"):
        train_prior(tokens, tmp_path / "r", tiny_cfg(steps=6), "cpu", resume=True, progress=False)
