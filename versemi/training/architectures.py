"""The second architecture of methods that train two different networks side by side (C3S3, MEDL).

``versemi.nets`` offers two backbones: the plan's nnU-Net-style U-Net (the plan's, possibly
anisotropic, kernels and strides, concatenating skips at every resolution) and the V-Net of the
VerSemi public code (isotropic 2x steps, additive skips, more convolutions per stage, no
full-resolution skip). Their errors differ, which is what two-network methods feed on. The V-Net
halves the patch four times, so it needs multiples of 16; ``unet`` (a second U-Net of the plan's
topology, another initialisation) serves patches it cannot take. ``auto`` (the trainers' default)
takes the V-Net where it can (3d, every patch a multiple of 16) and the second U-Net elsewhere (the
hippocampus' 40 x 56 x 40, any 2d configuration), so the trainers run on any plan; ``vnet`` asks for
the V-Net and refuses a plan it cannot take.
"""
from __future__ import annotations

from ..errors import input_error

SECOND_ARCHITECTURES = ("auto", "vnet", "unet")
VNET_DIVISOR = 16


def second_network(trainer: str, plan: dict, patch_sizes, architecture: str, base_features: int) -> tuple[str, dict]:
    """(member name, network plan) of the second network beside the plan's U-Net, which trains on
    every patch of ``patch_sizes`` (the shared one, and those of datasets with their own).

    ``base_features``: the V-Net's first-stage width (16 in the public V-Nets), at most the
    U-Net's first-stage width (quick runs with narrow ``--features`` stay small).

    Raises:
        InputError: an unknown architecture, or a patch the V-Net cannot take.
    """
    if architecture not in SECOND_ARCHITECTURES:
        raise input_error("--method", f"second_architecture {architecture!r} is unknown",
                          f"use one of {', '.join(SECOND_ARCHITECTURES)}")
    if not (isinstance(base_features, int) and not isinstance(base_features, bool) and base_features >= 1):
        raise input_error("--method", f"second_base_features {base_features!r} is not a positive whole number",
                          "give the V-Net's first-stage width, e.g. 16")
    if architecture == "auto":
        architecture = "vnet" if vnet_fits(plan, patch_sizes) else "unet"
    if architecture == "unet":
        return "unet2", dict(plan)
    if plan.get("spatial_dims", 3) == 2:
        raise input_error("--method", f"{trainer}'s second network is the V-Net here (second_architecture vnet), which "
                                      "is 3d only; this is a 2d configuration",
                          "train a second 2d U-Net instead: --method '{\"second_architecture\": \"unet\"}'")
    for patch_size in patch_sizes:
        if any(side % VNET_DIVISOR for side in patch_size):
            raise input_error("--patch-size", f"{trainer}'s V-Net halves the patch 4 times; patch {list(patch_size)} is "
                                              f"not a multiple of {VNET_DIVISOR} on every axis",
                              f"choose multiples of {VNET_DIVISOR} (--patch-size), or --method "
                              "'{\"second_architecture\": \"unet\"}'")
    return "vnet", {**plan, "architecture": "vnet", "features": [min(base_features, plan["features"][0])]}


def vnet_fits(plan: dict, patch_sizes) -> bool:
    """Whether the V-Net can take this plan: 3d, and every patch a multiple of 16 on every axis."""
    return plan.get("spatial_dims", 3) == 3 and not any(side % VNET_DIVISOR for patch in patch_sizes for side in patch)
