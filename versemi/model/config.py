"""Training settings (one dataclass, saved in every checkpoint) and what they make of the plan.

``effective_configuration`` is the one place where the run's overrides (``--patch-size``,
``--features``, ``--deep-supervision``) change the plan's patch and network: the trainer builds
its network from it, and a checkpoint without a stored network plan is rebuilt from it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..errors import input_error
from ..plans.topology import topology_for_patch
from .augmentation_settings import AugmentationSettings
from .plans_view import PlansView


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
    # --init-from: the checkpoint whose weights a new run starts from (a warm start); kept on --continue
    init_from: str | None = None
    # --network-size: "plan", "cpu" (the plan's cpu_preset) or "auto" (cpu_preset when training on a
    # CPU); a run stores the size it resolved to
    network_size: str = "auto"
    # --supervised-warm-up: "auto" or a share of the schedule trained supervised before a
    # semi-supervised method starts (versemi.training.warm_up); the epochs it resolved to
    supervised_warm_up: str = "auto"
    warm_up_epochs: int | None = None
    # --dataset-batches: where datasets have patches of their own, "each" step trains a sub-batch of
    # every dataset (gradients accumulated), or "one" dataset per step (versemi.training.data)
    dataset_batches: str = "each"
    # --absent-views: where a dataset declares another's structures absent, also learn the absence on
    # the view prediction shows their prompts (that dataset's preparation and patch; model.absent_views)
    absent_views: bool = True
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
        d.setdefault("network_size", "plan")  # saved before the CPU preset existed
        if "supervised_warm_up" not in d:  # saved before the warm-up existed: the method started at once
            d.update(supervised_warm_up="0", warm_up_epochs=0)
        d.setdefault("dataset_batches", "one")  # saved before sub-batches existed: one dataset per step
        d.setdefault("absent_views", False)  # saved before views existed: the own view only
        d["augmentation"] = AugmentationSettings(**d.get("augmentation", {}))
        return cls(**d)


NETWORK_SIZES = ("auto", "plan", "cpu")


def resolve_network_size(plans: dict, configuration: str, config: TrainingConfig, device_type: str) -> str | None:
    """Fix ``config.network_size`` to "plan" or "cpu" and fill the batch size and features the CPU
    preset sets where no override gave them; returns a line for the training log (None: no change)."""
    if config.network_size not in NETWORK_SIZES:
        raise ValueError(f"network_size must be one of {NETWORK_SIZES}; got {config.network_size!r}")
    preset = PlansView(plans).configuration(configuration).get("cpu_preset")
    wanted = config.network_size == "cpu" or (config.network_size == "auto" and device_type == "cpu")
    if config.network_size == "cpu" and preset is None:
        raise input_error("--network-size cpu", "the plan has no cpu_preset (planned by an older version)",
                          "plan the experiment again, or train with --features and --batch-size")
    if preset is None or not wanted:
        config.network_size = "plan"
        return None
    config.network_size = "cpu"
    taken = []
    if config.features is None and config.patch_size is None:  # a patch override re-derives its own features
        config.features = list(preset["features"])
        taken.append(f"features {'-'.join(map(str, preset['features']))}")
    if config.batch_size is None:
        config.batch_size = int(preset["batch_size"])
        taken.append(f"batch {preset['batch_size']}")
    if not taken:  # --features and --batch-size decided everything
        return None
    kept = "" if len(taken) == 2 else " (the rest as given on the command line)"
    return (f"network size: the plan's CPU preset, {', '.join(taken)}{kept}; "
            "--network-size plan trains the plan's full size")


@dataclass(frozen=True)
class EffectiveConfiguration:
    """The patch and network a run trains with: the plan's configuration after the run's overrides.
    ``dataset_patch_sizes``: datasets of a joint plan that train and predict with a patch of their
    own (``plans``' ``dataset_patch_sizes``; None with a ``--patch-size`` override or without any)."""

    patch_size: list[int]
    network_plan: dict
    dataset_patch_sizes: dict[str, list[int]] | None = None

    def patch_for(self, dataset: str | None) -> list[int]:
        """The patch of ``dataset``'s images (the shared one where it has none of its own)."""
        return patch_of(self.patch_size, self.dataset_patch_sizes, dataset)

    @property
    def all_patch_sizes(self) -> list[list[int]]:
        """The shared patch, then each distinct dataset's own."""
        return distinct_patches(self.patch_size, self.dataset_patch_sizes)


def patch_of(patch_size, dataset_patch_sizes: dict | None, dataset: str | None) -> list[int]:
    """The window of ``dataset``'s images: its own patch where it has one, else the shared one."""
    return list((dataset_patch_sizes or {}).get(dataset, patch_size))


def distinct_patches(patch_size, dataset_patch_sizes: dict | None) -> list[list[int]]:
    """Every window shape a run trains and predicts with: the shared patch first, no repeats."""
    shapes = [tuple(patch_size), *(tuple(p) for p in (dataset_patch_sizes or {}).values())]
    return [list(p) for p in dict.fromkeys(shapes)]


def effective_configuration(plans: dict, configuration: str, config: TrainingConfig) -> EffectiveConfiguration:
    """The plan's patch and network, overridden by ``config``: a patch-size override re-derives the
    topology, a features override sets the features per stage (the last value repeats for deeper
    stages), a deep-supervision override switches it."""
    view = PlansView(plans)
    plan = view.configuration(configuration)
    network = dict(plan["network"])
    if config.patch_size:
        try:
            topology = topology_for_patch(plan["topology_spacing"], config.patch_size, view.spatial_dims(configuration))
        except ValueError as exc:
            raise input_error("--patch-size", str(exc), "give a 2d configuration's patch as 1 Y X") from exc
        network.update(strides=topology.strides, kernel_sizes=topology.kernel_sizes, features=topology.features)
    if config.features:
        wanted = list(config.features)
        network["features"] = [wanted[min(i, len(wanted) - 1)] for i in range(len(network["strides"]))]
    if config.deep_supervision is not None:
        network["deep_supervision"] = config.deep_supervision
    own = None if config.patch_size else plan.get("dataset_patch_sizes") or None
    return EffectiveConfiguration(list(config.patch_size or plan["patch_size"]), network, own)
