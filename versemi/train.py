"""``python -m versemi.train`` (what torchrun starts): the same as ``versemi_train``."""
from .cli import train_main

if __name__ == "__main__":
    train_main()
