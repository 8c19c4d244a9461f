"""A short-schedule nnU-Net trainer for CPU runs and studies.

The class keeps nnUNetTrainer's ``__init__`` signature because nnU-Net re-creates trainers from
the init arguments stored in checkpoints, and checkpoints store the class *name*: prediction from a
model folder looks the class up by that name. Two ways keep that working:
- the runner here never looks it up (it imports the class and uses ``manual_initialization``), and
- ``trainer_search_path()`` is a folder to put into ``nnUNet_extTrainer`` so nnU-Net's own tools
  (``nnUNetv2_train -tr nnUNetTrainerPathar``, ``nnUNetv2_predict``) find it by name.

The schedule comes from instance attributes set after construction (``apply_schedule``), or from
the ``PATHAR_NNUNET_*`` environment variables when nnU-Net constructs the class itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

ENV_EPOCHS = "PATHAR_NNUNET_EPOCHS"
ENV_ITERATIONS = "PATHAR_NNUNET_ITERATIONS"
ENV_VAL_ITERATIONS = "PATHAR_NNUNET_VAL_ITERATIONS"


@dataclass(frozen=True)
class Schedule:
    """How long a fold trains. nnU-Net's default is 1000 epochs x 250 iterations (50 validation)."""

    epochs: int = 100
    iterations_per_epoch: int = 50
    val_iterations_per_epoch: int = 10
    save_every: int = 10  # epochs between resumable checkpoints
    # epochs (1-based) after which a copy of the weights is kept as checkpoint_epoch<E>.pth, so a
    # learning curve can be measured from one run instead of one run per point
    snapshot_epochs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("epochs", "iterations_per_epoch", "val_iterations_per_epoch", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"Schedule.{name} must be >= 1")
        bad = [e for e in self.snapshot_epochs if not 1 <= e <= self.epochs]
        if bad:
            raise ValueError(f"Schedule.snapshot_epochs must lie in 1..{self.epochs}, got {bad}")

    def curve_epochs(self, fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)) -> tuple[int, ...]:
        """The epochs at these fractions of the schedule (at least epoch 1)."""
        return tuple(sorted({max(1, round(f * self.epochs)) for f in fractions}))

    @property
    def iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch

    @classmethod
    def from_env(cls) -> "Schedule":
        default = cls()
        return cls(
            epochs=int(os.environ.get(ENV_EPOCHS, default.epochs)),
            iterations_per_epoch=int(os.environ.get(ENV_ITERATIONS, default.iterations_per_epoch)),
            val_iterations_per_epoch=int(os.environ.get(ENV_VAL_ITERATIONS, default.val_iterations_per_epoch)),
        )


class nnUNetTrainerPathar(nnUNetTrainer):
    """nnUNetTrainer with a short, settable schedule (see ``Schedule``)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.apply_schedule(Schedule.from_env())

    def apply_schedule(self, schedule: Schedule) -> None:
        # read by run_training and by the poly LR scheduler, which configure_optimizers builds later
        self.num_epochs = schedule.epochs
        self.num_iterations_per_epoch = schedule.iterations_per_epoch
        self.num_val_iterations_per_epoch = schedule.val_iterations_per_epoch
        self.save_every = schedule.save_every
        self.snapshot_epochs = tuple(schedule.snapshot_epochs)

    def on_epoch_end(self) -> None:
        # nnU-Net counts epochs from 0 and increments at the end of on_epoch_end; saved before that, the
        # snapshot records current_epoch = epochs finished, as nnU-Net's own checkpoints do
        finished = self.current_epoch + 1
        if finished in getattr(self, "snapshot_epochs", ()):
            self.save_checkpoint(str(snapshot_path(Path(self.output_folder), finished)))
        super().on_epoch_end()


def snapshot_path(fold_dir: Path, epoch: int) -> Path:
    """Where ``nnUNetTrainerPathar`` keeps the weights after ``epoch`` (1-based) epochs."""
    return Path(fold_dir) / f"checkpoint_epoch{epoch:04d}.pth"


def trainer_search_path() -> Path:
    """Folder for ``nnUNet_extTrainer``: it holds a top-level module re-exporting the trainer."""
    return Path(__file__).resolve().parent / "ext_trainers"
