"""Every structure of the demo experiment in one label map, against one prompt at a time.

    make demo    # plans, trains and predicts the demo pair (DemoLA + DemoPancreas)
    python benchmarks/multi_prompt_demo.py [--trainer VerSemiTrainer] [--no-mirroring]

For each test image of both demo datasets it predicts every prompt of the experiment into one
label map (``versemi_predict -p all``) and each prompt on its own (0/1 masks), and prints per case:
the voxels of each label value; how many voxels of each single-prompt mask and of the label map's
value disagree outside the voxels that several prompts claim (the multi-prompt rule says: none);
the claimed-by-several voxels; and the Dice of the image's own structure against its reference,
from the label map and from the single prompt. Not a test.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="DemoLA_DemoPancreas")
    parser.add_argument("--trainer", default="VerSemiTrainer")
    parser.add_argument("--folds", nargs="+", default=None)
    parser.add_argument("--no-mirroring", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/_work/multi_prompt_demo"))
    args = parser.parse_args()

    from versemi import paths
    from versemi.datasets.io import read_image, read_label
    from versemi.evaluation.metrics import dice
    from versemi.inference import load_models, predict_cases
    from versemi.model.plans_view import PlansView

    ensemble = load_models(paths.results_root() / args.experiment, args.folds, args.trainer)
    prompts = PlansView(ensemble.plans).real_prompts
    mirroring = not args.no_mirroring
    print(f"{args.experiment}, {args.trainer} fold(s) {', '.join(ensemble.folds)}, mirroring "
          f"{'on' if mirroring else 'off'}; prompts: " + ", ".join(f"{p['index']} {p['dataset']}/{p['label']}"
                                                                   for p in prompts))
    rows = []
    for dataset in dict.fromkeys(p["dataset"] for p in prompts):
        images = paths.raw_root() / dataset / "imagesTs"
        maps = predict_cases([images], args.work / dataset / "all", prompts, ensemble, mirroring=mirroring,
                             save_probabilities=True, overwrite=True, show_progress=False)
        table = json.loads((args.work / dataset / "all" / "labels.json").read_text(encoding="utf-8"))
        single = {}
        for p in prompts:
            folder = args.work / dataset / f"prompt{p['index']}"
            single[p["index"]] = predict_cases([images], folder, p, ensemble, mirroring=mirroring, overwrite=True,
                                               show_progress=False)
        own = [p for p in prompts if p["dataset"] == dataset]
        for n, path in enumerate(maps):
            labels = read_image([path])[0][0].astype(np.int64)
            probabilities = np.load(path.with_name(path.name.split(".")[0] + "_prob.npz"))["probabilities"]
            several = (probabilities > 0.5).sum(0) > 1
            case = path.name.split(".")[0]
            reference, _ = read_label(paths.raw_root() / dataset / "labelsTs" / path.name)
            counts, disagreements, own_dice = [], [], []
            for entry in table["labels"]:
                mask = read_image([single[entry["prompt"]][n]])[0][0].astype(bool)
                value = labels == entry["value"]
                counts.append(f"{entry['value']}: {int(value.sum())}")
                disagreements.append(f"{entry['value']}: {int((mask != value)[~several].sum())}")
                prompt = next(p for p in prompts if p["index"] == entry["prompt"])
                if prompt in own:
                    truth = reference == int(prompt["label_value"])
                    own_dice.append(f"{prompt['label']} {100 * dice(value, truth):.2f} / {100 * dice(mask, truth):.2f}")
            rows.append(f"| {dataset} | {case} | {', '.join(counts)} | {', '.join(disagreements)} | "
                        f"{int(several.sum())} | {'; '.join(own_dice)} |")
    print("\nlabel values (labels.json): " + ", ".join(f"{e['value']} = {e['dataset']}/{e['label']}"
                                                        for e in table["labels"]) + f"; {table['values']}")
    print("| dataset | case | voxels per value | disagreement with the single prompt outside overlaps | "
          "voxels claimed by several prompts | own structure Dice %: label map / single prompt |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
