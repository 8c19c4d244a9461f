"""pathar-aug: PathAR synthetic image-mask pairs for nuclei segmentation with nnU-Net v2."""

__version__ = "0.1.0"
