"""Training settings: one dataclass, saved in every checkpoint."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .augmentation import AugmentationSettings

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainingConfig:
    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    optimizer: str = "sgd"            # "sgd" (Nesterov, nnU-Net) or "adam"
    lr: float | None = None           # default: 1e-2 for SGD, 1e-3 for Adam
    weight_decay: float = 3e-5
    momentum: float = 0.99
    adam_betas: tuple[float, float] = (0.9, 0.999)
    poly_exponent: float = 0.9        # poly LR decay; 0 keeps the LR constant
    grad_clip: float = 12.0
    seed: int = 0
    num_workers: int = 2              # background processes per data stream
    amp: bool = True                  # mixed precision; False (--no-amp) trains in fp32
    precision: str = "auto"           # auto: bf16 on CPUs with bf16 units and on CUDA (fp16 on old GPUs)
    compile: bool = False             # torch.compile, CUDA only
    oversample_foreground: float = 0.33
    augmentation: AugmentationSettings = field(default_factory=AugmentationSettings)
    # quick-run overrides of the plan (tests, CPU demos); None keeps the plan's value
    patch_size: list[int] | None = None
    batch_size: int | None = None
    unlabeled_batch_size: int | None = None   # None: the labeled batch size
    features: list[int] | None = None
    deep_supervision: bool | None = None
    # --time-budget: minutes for the whole schedule; ``budget`` records what the warm-up chose
    time_budget: float | None = None
    budget: dict | None = None
    # method settings read by the trainer subclasses
    method: dict = field(default_factory=dict)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-2 if self.optimizer == "sgd" else 1e-3)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["augmentation"] = AugmentationSettings(**d.get("augmentation", {}))
        return cls(**d)
