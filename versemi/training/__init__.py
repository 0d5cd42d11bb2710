"""Training: data loading and augmentation, the fold-based loop, and the method subclasses."""
