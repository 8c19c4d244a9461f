# Imported by nnU-Net as a top-level module (nnUNet_extTrainer), so it only re-exports the class.
from nnunet_integration.trainer import nnUNetTrainerPathar  # noqa: F401
