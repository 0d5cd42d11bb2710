"""VerSemi: semi-supervised 3D medical image segmentation across several datasets at once."""

__version__ = "0.1.0"
