"""The cases to predict: channel files grouped by case, their headers checked, and the output
folder checked; every problem is reported before anything is written."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import SimpleITK as sitk

from ..datasets.io import SUPPORTED_ENDINGS, file_ending
from ..errors import InputError, Problem

CHANNEL_NAME = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class InputCase:
    """One case to predict: its channel files in order and their file ending."""

    case_id: str
    files: tuple[Path, ...]
    ending: str

    def output_path(self, folder: Path) -> Path:
        return Path(folder) / f"{self.case_id}{self.ending}"

    def probabilities_path(self, folder: Path) -> Path:
        return Path(folder) / f"{self.case_id}_prob.npz"


def _discover(inputs: Sequence[Path], in_channels: int) -> tuple[list[InputCase], list[Problem]]:
    problems: list[Problem] = []
    entries: dict[str, dict] = {}

    def add(case: str, channel: int, path: Path, ending: str) -> None:
        entry = entries.setdefault(case, {"ending": ending, "channels": {}})
        if entry["ending"] != ending:
            problems.append(Problem(str(path), f"case {case!r} is also given as a {entry['ending']} file",
                                    "give each case once, all channels in one format"))
        elif channel in entry["channels"] and entry["channels"][channel].resolve() != path.resolve():
            problems.append(Problem(str(path), f"case {case!r} channel {channel} is also given as "
                                               f"{entry['channels'][channel]}", "give each case once"))
        else:
            entry["channels"][channel] = path

    for item in map(Path, inputs):
        if item.is_dir():
            found = 0
            for child in sorted(item.iterdir()):
                ending = file_ending(child)
                if child.name.startswith(".") or not ending or not child.is_file():
                    continue  # hidden (e.g. partial writes) and non-image files
                m = CHANNEL_NAME.match(child.name[:-len(ending)])
                if m is None:
                    problems.append(Problem(str(child), f"is not named CASE_XXXX{ending} (one file per channel: "
                                                        "_0000, _0001, ...)",
                                            f"rename it, e.g. to {child.name[:-len(ending)]}_0000{ending}, or pass "
                                            "it with -i on its own"))
                    continue
                add(m["case"], int(m["channel"]), child, ending)
                found += 1
            if not found and not any(p.file.startswith(str(item)) for p in problems):
                problems.append(Problem(str(item), "holds no images named CASE_0000<ending> "
                                                   f"({', '.join(SUPPORTED_ENDINGS)})",
                                        "point -i at the folder of images, or at the image files"))
        elif item.is_file():
            ending = file_ending(item)
            if not ending:
                problems.append(Problem(str(item), "unsupported file ending",
                                        f"use one of {', '.join(SUPPORTED_ENDINGS)}"))
                continue
            stem = item.name[:-len(ending)]
            m = CHANNEL_NAME.match(stem)
            if m:
                add(m["case"], int(m["channel"]), item, ending)
            else:  # a single-channel image without the _0000 suffix: the case is its name
                add(stem, 0, item, ending)
        else:
            problems.append(Problem(str(item), "does not exist", "check the path given with -i"))

    cases = []
    expected = list(range(in_channels))
    for case_id in sorted(entries):
        entry = entries[case_id]
        channels = entry["channels"]
        files = [channels[c] for c in sorted(channels)]
        if sorted(channels) != expected:
            names = ", ".join(f.name for f in files)
            want = ", ".join(f"{case_id}_{c:04d}{entry['ending']}" for c in expected)
            problems.append(Problem(str(files[0]), f"case {case_id!r} has {len(files)} channel file(s) ({names}) but "
                                                   f"the model takes {in_channels} channel(s)",
                                    f"give exactly the files {want}"))
            continue
        cases.append(InputCase(case_id, tuple(files), entry["ending"]))
    return cases, problems


def find_cases(inputs: Sequence[str | Path], in_channels: int) -> list[InputCase]:
    """Cases of the input folders (``CASE_0000.ext`` files grouped by case) and files; InputError
    listing every problem (wrong channel count, unknown files) at once."""
    cases, problems = _discover([Path(p) for p in inputs], in_channels)
    if problems:
        raise InputError(problems)
    return cases


def _header_problems(case: InputCase) -> list[Problem]:
    """Unreadable or non-3D channel files, and channels of different size, from the headers only."""
    problems, size = [], None
    for path in case.files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            lines = str(exc).strip().splitlines()
            problems.append(Problem(str(path), f"cannot be read as an image ({(lines[-1] if lines else '')[:200]})",
                                    "replace it with an intact copy"))
            continue
        dimension = 2 if file_ending(path) == ".png" else 3  # a PNG is one 2D slice (datasets.io)
        if reader.GetDimension() != dimension or reader.GetNumberOfComponents() != 1:
            problems.append(Problem(str(path), f"is not a single-channel 3D image (dimension {reader.GetDimension()}, "
                                               f"{reader.GetNumberOfComponents()} components per voxel)",
                                    "store each channel as its own 3D file CASE_0000, CASE_0001, ..."))
        elif size is None:
            size = reader.GetSize()
        elif reader.GetSize() != size:
            problems.append(Problem(str(path), f"size {reader.GetSize()} differs from the case's first channel {size}",
                                    "resample all channels of a case onto the same voxel grid"))
    return problems


def _output_problems(cases: list[InputCase], inputs: Sequence[Path], output_folder: Path, save_probabilities: bool,
                     overwrite: bool) -> list[Problem]:
    out = output_folder.resolve()
    if out.exists() and not out.is_dir():
        return [Problem(str(output_folder), "exists and is not a folder", "choose a folder for -o")]
    input_files = {f.resolve() for c in cases for f in c.files}
    input_folders = {p.resolve() for p in inputs if p.is_dir()} | {f.parent for f in input_files}
    if out in input_folders:
        return [Problem(str(output_folder), "is the input folder: predictions would be written among (and could "
                                            "overwrite) the input images", "write the predictions to another folder")]
    targets = [c.output_path(out) for c in cases]
    if save_probabilities:
        targets += [c.probabilities_path(out) for c in cases]
    clashes = [t for t in targets if t in input_files]
    if clashes:
        return [Problem(str(clashes[0]), "would overwrite an input image", "write the predictions to another folder")]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        names = ", ".join(t.name for t in existing[:5])
        names += f" and {len(existing) - 5} more" if len(existing) > 5 else ""
        return [Problem(str(output_folder), f"{len(existing)} output file(s) exist already ({names})",
                        "pass --overwrite to replace them, or choose another output folder")]
    return []
