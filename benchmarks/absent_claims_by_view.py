"""Claims of a structure declared absent, by how the image is shown to its prompt (demo pair).

``versemi_predict -p all`` normalizes and resamples an image once per dataset among the prompts,
as that dataset's plan says: the atrium prompt sees a pancreas CT normalized as an MRI. Training
showed it the CT as the pancreas dataset's plan normalizes it. This prints, for each structure on
the other dataset's test images, the share of the cropped image's voxels its prompt claims
(probability > 0.5, no mirroring) in both views, for a checkpoint of the demo pair.

    python benchmarks/absent_claims_by_view.py RUN_FOLDER RAW    # RUN_FOLDER/results/*/*/fold_0/checkpoint_final.pth

(``RUN_FOLDER`` and ``RAW`` as ``benchmarks/demo_budget.py`` writes them.) Not a test.
"""

from __future__ import annotations

import glob
import sys

import numpy as np
import torch


def claimed_share(ensemble, case, prompt: dict) -> float:
    """Share of the cropped image's voxels where ``prompt`` (shown the image as its ``dataset`` says) claims."""
    from versemi.inference.predictor import cropped_probabilities, network_probabilities, prepare_case

    prepared = prepare_case(ensemble, case.images, [prompt])
    probability = cropped_probabilities(prepared, network_probabilities(ensemble, prepared, [prompt], mirroring=False), 1)
    return float((probability[0] > 0.5).mean())


def main() -> None:
    from versemi.datasets.layout import load_dataset
    from versemi.inference import load_models
    from versemi.model.plans_view import PlansView

    torch.set_num_threads(1)
    run_folder, raw = sys.argv[1], sys.argv[2]
    ensemble = load_models([glob.glob(f"{run_folder}/results/*/*/fold_0/checkpoint_final.pth")[0]])
    prompts = {p["dataset"]: p for p in PlansView(ensemble.plans).real_prompts}
    for images_of, other in (("DemoPancreas", "DemoLA"), ("DemoLA", "DemoPancreas")):
        cases = load_dataset(f"{raw}/{images_of}").test_cases()
        for view, prompt in ((f"as {other} (prediction today)", prompts[other]),
                             (f"as {images_of} (as training showed it)", {**prompts[other], "dataset": images_of})):
            shares = [claimed_share(ensemble, case, prompt) for case in cases]
            print(f"{other} prompt on {images_of} test images, normalized {view}: {100 * np.mean(shares):.3f} % "
                  f"of the voxels ({len(shares)} cases)")


if __name__ == "__main__":
    main()
