"""Put this folder into ``nnUNet_extTrainer`` so nnU-Net finds ``nnUNetTrainerPathar`` by name."""
