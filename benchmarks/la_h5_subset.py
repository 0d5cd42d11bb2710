"""A subset of the UA-MT LA folder (``<ID>/mri_norm2.h5``, ``train.list``) in one small file, and back.

For a GPU machine that can receive only a few tens of MB (``benchmarks/gpu_check.sh``): the first 8
ids of train.list (the labeled cases), the next ``--unlabeled`` and the last ``--test`` ids. The pack
is lossless: each normalised image holds at most 256 distinct values, so it is stored as uint8
indices into its value table (lzma-compressed, about 1.4 MB a case against 2.7 MB of gzip h5), and
unpacking writes h5 files whose arrays equal the originals exactly.

    python benchmarks/la_h5_subset.py pack ../shared/data/la2018_h5 la_subset.xz --unlabeled 3 --test 3
    python benchmarks/la_h5_subset.py unpack la_subset.xz /tmp/la2018_h5    # on the other machine
    GPU_CHECK_TEST_CASES=3 bash benchmarks/gpu_check.sh /tmp/la2018_h5
"""
from __future__ import annotations

import argparse
import io
import lzma
import sys
from pathlib import Path

import h5py
import numpy as np

LABELED = 8


def pack(source: Path, target: Path, unlabeled: int, test: int) -> list[str]:
    ids = [line.strip() for line in (source / "train.list").read_text(encoding="utf-8").splitlines() if line.strip()]
    if LABELED + unlabeled + test > len(ids):
        sys.exit(f"{source / 'train.list'}: {len(ids)} ids, fewer than {LABELED} labeled + {unlabeled} unlabeled + "
                 f"{test} test; ask for fewer")
    chosen = ids[:LABELED + unlabeled] + ids[len(ids) - test:]
    arrays = {"ids": np.array(chosen)}
    for i, case in enumerate(chosen):
        with h5py.File(source / case / "mri_norm2.h5", "r") as f:
            image, label = f["image"][:], f["label"][:]
        table, index = np.unique(image, return_inverse=True)
        if len(table) > 256:
            sys.exit(f"{source / case / 'mri_norm2.h5'}: {len(table)} distinct image values, more than a uint8 "
                     "index can hold; this packer only suits the 8-bit-derived UA-MT LA images")
        arrays[f"table{i}"] = table
        arrays[f"index{i}"] = index.reshape(image.shape).astype(np.uint8)
        arrays[f"label{i}"] = label
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(lzma.compress(buffer.getvalue(), preset=6))
    partial.replace(target)
    return chosen


def unpack(packed: Path, folder: Path) -> list[str]:
    data = np.load(io.BytesIO(lzma.decompress(packed.read_bytes())))
    ids = [str(case) for case in data["ids"]]
    for i, case in enumerate(ids):
        (folder / case).mkdir(parents=True, exist_ok=True)
        with h5py.File(folder / case / "mri_norm2.h5", "w") as f:
            f.create_dataset("image", data=data[f"table{i}"][data[f"index{i}"]], compression="gzip")
            f.create_dataset("label", data=data[f"label{i}"], compression="gzip")
    (folder / "train.list").write_text("\n".join(ids) + "\n", encoding="utf-8")
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    pack_parser = verbs.add_parser("pack", help="write a subset of an LA h5 folder into one file")
    pack_parser.add_argument("source", type=Path)
    pack_parser.add_argument("target", type=Path)
    pack_parser.add_argument("--unlabeled", type=int, default=3)
    pack_parser.add_argument("--test", type=int, default=3)
    unpack_parser = verbs.add_parser("unpack", help="write the packed cases as an LA h5 folder")
    unpack_parser.add_argument("packed", type=Path)
    unpack_parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.verb == "pack":
        ids = pack(args.source, args.target, args.unlabeled, args.test)
        print(f"packed {len(ids)} cases into {args.target} ({args.target.stat().st_size / 1e6:.1f} MB)")
    else:
        ids = unpack(args.packed, args.folder)
        print(f"unpacked {len(ids)} cases into {args.folder}")


if __name__ == "__main__":
    main()
