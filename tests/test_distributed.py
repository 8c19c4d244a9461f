"""Real torchrun jobs of 2 CPU processes (gloo): DDP training equals one process, and distributed
synthesis writes each case once into a dataset nnU-Net accepts, whichever rank dies."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import write_pair_folders

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
# DDP averages the two ranks' gradients where one process averages over the whole batch: the same
# numbers summed in another order, so float32 rounding is the only difference allowed.
RTOL, ATOL = 1e-4, 1e-6
GAN_RTOL, GAN_ATOL = 5e-3, 1e-4  # the adversarial stage (see its test)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout, cwd=ROOT)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def alone(*args: str, timeout: float = 300) -> None:
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env(), timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


def rows(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in r.items() if k != "minutes"} for r in csv.DictReader(f)]


def assert_same_log(a: Path, b: Path, steps: list[int], rtol: float = RTOL) -> None:
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == steps  # one writer: no doubled rows
    for x, y in zip(ra, rb):
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=rtol, abs=ATOL), (a.name, x["step"], key)


def assert_same_weights(a: Path, b: Path, rtol: float = RTOL, atol: float = 1e-5) -> None:
    wa = torch.load(a, weights_only=False)["model"]
    wb = torch.load(b, weights_only=False)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        if wa[key].is_floating_point():
            torch.testing.assert_close(wa[key], wb[key], rtol=rtol, atol=atol, msg=key)
        else:
            assert torch.equal(wa[key], wb[key]), key


def test_ddp_training_equals_one_process_and_its_checkpoint_resumes_in_one_process(tmp_path):
    """Tokenizer and prior, tiny preset, global batch 8: 2 ranks x 4 rows against 1 process x 8."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    torchrun(str(WORKER), str(ddp), "4")
    alone(str(WORKER), str(single), "4")
    for log in ("tokenizer/tokenizer_loss.csv", "prior/prior_loss.csv"):
        assert_same_log(ddp / log, single / log, [1, 2, 3, 4])
    for ckpt in ("tokenizer/tokenizer.pt", "prior/prior.pt"):
        assert_same_weights(ddp / ckpt, single / ckpt)
    # the checkpoint written under DDP goes on in one process exactly as one process's own does
    alone(str(WORKER), str(ddp), "8", "--resume")
    alone(str(WORKER), str(single), "8", "--resume")
    for log in ("tokenizer/tokenizer_loss.csv", "prior/prior_loss.csv"):
        assert_same_log(ddp / log, single / log, list(range(1, 9)))
    for ckpt in ("tokenizer/tokenizer.pt", "prior/prior.pt"):
        assert torch.load(ddp / ckpt, weights_only=False)["step"] == 8
        assert_same_weights(ddp / ckpt, single / ckpt)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """A tiny run trained by `torchrun -m pathar_aug train` on 2 processes (every stage)."""
    root = tmp_path_factory.mktemp("ddp_run")
    images, masks = write_pair_folders(root / "data", n=10, size=64, labels=("bright", "dark"))
    run = root / "run"
    res = torchrun("-m", "pathar_aug", "train", "--images", str(images), "--masks", str(masks), "--preset", "tiny",
                   "--tokenizer-steps", "6", "--prior-steps", "6", "--out", str(run), "--quiet",
                   "--val-fraction", "0.2", "--device", "cpu")
    assert res.stderr.count("[2/4] tokenizer") == 1, res.stderr  # rank 0 alone reports
    for rel in ("tokenizer/tokenizer.pt", "prior/prior.pt", "samples_preview.png", "filter/filter.json",
                "sampling.json"):
        assert (run / rel).is_file(), rel
    assert [int(r["step"]) for r in rows(run / "prior" / "prior_loss.csv")] == [5, 6]
    return run


def file_hashes(dataset: Path) -> dict[str, str]:
    return {str(p.relative_to(dataset)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in ("imagesTr", "labelsTr") for p in sorted((dataset / folder).iterdir())}


def synthetic_state(dataset: Path) -> tuple[dict, dict]:
    return (json.loads((dataset / "dataset.json").read_text()),
            json.loads((dataset / "pathar_aug_manifest.json").read_text()))


def test_distributed_synthesis_passes_nnunet_with_exactly_n_cases_as_one_process_makes(ddp_run, tmp_path, monkeypatch):
    from nnunet_integration.runner import verify

    raw = tmp_path / "raw"
    raw.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(raw))
    args = ["--model", str(ddp_run), "-n", "10", "--batch-size", "4", "--device", "cpu", "--no-filter"]
    torchrun("-m", "pathar_aug", "synthesize", "--into", "520", *args)  # 3 chunks: ranks 0, 1, 0
    alone("-m", "pathar_aug", "synthesize", "--into", "521", *args)
    two, one = (next(raw.glob(f"Dataset{i}_*")) for i in (520, 521))
    verify(two)  # nnU-Net's own integrity check
    dj, manifest = synthetic_state(two)
    assert dj["numTraining"] == 10 and len(dj["dataset"]) == 10
    assert len(manifest["cases"]) == 10 and {c["state"] for c in manifest["cases"].values()} == {"committed"}
    assert len(list((two / "imagesTr").iterdir())) == len(list((two / "labelsTr").iterdir())) == 10
    assert file_hashes(two) == file_hashes(one)  # the same pairs, whatever the number of processes


def _worker_of(parent: int, rank: int) -> int | None:
    """Pid of the torchrun worker of ``rank`` started by process ``parent``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_rank_killed_mid_synthesis_leaves_a_valid_dataset_and_the_rerun_writes_each_case_once(
        ddp_run, tmp_path, monkeypatch):
    from nnunet_integration.runner import verify

    raw = tmp_path / "raw"
    raw.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(raw))
    n = 240
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pathar_aug",
           "synthesize", "--model", str(ddp_run), "--into", "522", "-n", str(n), "--batch-size", "4",
           "--device", "cpu", "--no-filter"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), cwd=ROOT)
    killed, deadline = False, time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = list(raw.glob("Dataset522_*/pathar_aug_manifest.json"))
        try:
            committed = sum(c["state"] == "committed" for c in json.loads(found[0].read_text())["cases"].values()) \
                if found else 0
        except (json.JSONDecodeError, KeyError, OSError):
            committed = 0
        worker = _worker_of(proc.pid, 1)
        if committed >= 12 and worker is not None:
            os.kill(worker, signal.SIGKILL)  # rank 1 dies; torchrun then stops rank 0, the writer
            killed = True
            break
        time.sleep(0.05)
    assert killed and proc.wait(timeout=120) != 0, "synthesis finished before a rank could be killed; raise n"
    dataset = next(raw.glob("Dataset522_*"))
    dj, manifest = synthetic_state(dataset)
    assert 0 < dj["numTraining"] < n
    verify(dataset)  # valid as it was left
    torchrun(*cmd[6:])  # the same command again
    dj, manifest = synthetic_state(dataset)
    assert dj["numTraining"] == n and len(dj["dataset"]) == n
    assert len(manifest["cases"]) == n and {c["state"] for c in manifest["cases"].values()} == {"committed"}
    names = sorted(p.name for p in (dataset / "imagesTr").iterdir())
    assert len(names) == n and not any(name.endswith(".tmp") for name in names)
    verify(dataset)


def test_ddp_adversarial_decoder_stage_equals_one_process_and_resumes(tmp_path):
    """The image decoder's adversarial steps (decoder and discriminator under DDP, the adaptive
    weight from rank-averaged gradients) give one process's numbers, and go on after a resume.
    Looser than the tokenizer's own check: Adam's first steps move every weight by about the
    learning rate whatever its gradient's size, so float32 rounding in the tiny gradients of a
    fresh discriminator shows up at 1e-3 in the next step's scores (a per-rank adaptive weight,
    by contrast, is off by tens of percent)."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    torchrun(str(WORKER), str(ddp), "2", "--adversarial", "3")
    alone(str(WORKER), str(single), "2", "--adversarial", "3")
    log = "tokenizer/tokenizer_adversarial_loss.csv"
    assert_same_log(ddp / log, single / log, [3, 4, 5], rtol=GAN_RTOL)
    assert_same_weights(ddp / "tokenizer/tokenizer.pt", single / "tokenizer/tokenizer.pt", GAN_RTOL, GAN_ATOL)
    alone(str(WORKER), str(ddp), "2", "--adversarial", "5", "--resume")
    alone(str(WORKER), str(single), "2", "--adversarial", "5", "--resume")
    assert_same_log(ddp / log, single / log, [3, 4, 5, 6, 7], rtol=GAN_RTOL)
    assert_same_weights(ddp / "tokenizer/tokenizer.pt", single / "tokenizer/tokenizer.pt", GAN_RTOL, GAN_ATOL)
