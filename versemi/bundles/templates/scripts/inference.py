"""The bundle's inference helpers, called from configs/inference.json (standard library, torch, MONAI).

- ``load_torchscript``: the model, after checking the integrity of the model files;
- ``find_images``: the input folder's NIfTI files grouped into cases;
- ``ResampleToSpacingd``: resampling to the plan's spacing exactly as nnU-Net/versemi do it, invertible;
- ``predict``: the loop (sliding window per case, then the postprocessing transforms);
- ``LabelMapd`` and ``copy_label_table``: several prompts in one label map, and its table of values.

``models/checksums.json`` records the SHA-256 of each model file. A missing or changed model file
stops the bundle with ``BundleIntegrityError`` naming the file and the fix, instead of silently
running a damaged or swapped model.
"""
import hashlib
import json
import logging
import os
import re
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.utils import TraceKeys
from scipy.ndimage import zoom

CHECKSUMS = "models/checksums.json"
logger = logging.getLogger("versemi_bundle")


class BundleIntegrityError(RuntimeError):
    """A model file of the bundle does not match the SHA-256 recorded when it was exported."""


def sha256(path, chunk_size=1 << 20):
    """The hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_model_files(bundle_root):
    """Check every file listed in models/checksums.json; return the listing {relative path: sha256}."""
    listing = os.path.join(bundle_root, CHECKSUMS)
    if not os.path.isfile(listing):
        raise BundleIntegrityError(f"{listing} is missing, so the model files cannot be verified; re-export the "
                                   "bundle (versemi_export_bundle), or pass --bundle_root if the bundle lies "
                                   "elsewhere")
    with open(listing, encoding="utf-8") as f:
        expected = json.load(f)["sha256"]
    problems = []
    for relative, digest in sorted(expected.items()):
        path = os.path.join(bundle_root, relative)
        if not os.path.isfile(path):
            problems.append(f"{relative}: missing")
            continue
        actual = sha256(path)
        if actual != digest:
            problems.append(f"{relative}: SHA-256 {actual} differs from the recorded {digest} (changed or damaged)")
    if problems:
        raise BundleIntegrityError("the bundle's model files failed the integrity check:\n  " + "\n  ".join(problems)
                                   + "\nfix: restore the bundle from its source or export it again "
                                     "(versemi_export_bundle --overwrite)")
    return expected


def load_torchscript(bundle_root, relative_path, device):
    """The verified TorchScript model ``relative_path`` of the bundle, in eval mode on ``device``."""
    expected = verify_model_files(bundle_root)
    if relative_path not in expected:
        raise BundleIntegrityError(f"{relative_path} is not listed in {CHECKSUMS}; export the bundle again")
    model = torch.jit.load(os.path.join(bundle_root, relative_path), map_location=device)
    return model.eval()


IMAGE = re.compile(r"^(?P<case>.+?)(_(?P<channel>\d{4}))?(?P<ending>\.nii\.gz|\.nii)$")


def find_images(dataset_dir, num_channels):
    """The cases of ``dataset_dir`` as MONAI data dicts ``{"image": file or [channel files]}``.

    Files are ``CASE_XXXX.nii.gz`` (or ``.nii``), one per channel; a single-channel model also
    takes ``CASE.nii.gz``. Raises ValueError listing every problem (no images, missing channels).
    """
    if not os.path.isdir(dataset_dir):
        raise ValueError(f"--dataset_dir {dataset_dir} is not a folder; point it at the folder of input images")
    cases, problems = {}, []
    for name in sorted(os.listdir(dataset_dir)):
        m = IMAGE.match(name)
        if name.startswith(".") or m is None or not os.path.isfile(os.path.join(dataset_dir, name)):
            continue
        channel = 0 if m["channel"] is None else int(m["channel"])
        if m["channel"] is None and num_channels != 1:
            problems.append(f"{name}: the model takes {num_channels} channels; name the files CASE_0000, "
                            "CASE_0001, ...")
            continue
        cases.setdefault(m["case"], {})[channel] = os.path.join(dataset_dir, name)
    if not cases and not problems:
        raise ValueError(f"--dataset_dir {dataset_dir} holds no NIfTI images (CASE_0000.nii.gz or CASE.nii.gz)")
    data = []
    for case, channels in sorted(cases.items()):
        if sorted(channels) != list(range(num_channels)):
            found = ", ".join(os.path.basename(channels[c]) for c in sorted(channels))
            problems.append(f"case {case}: files {found}, but the model takes {num_channels} channel(s) "
                            f"_0000 .. _{num_channels - 1:04d}")
            continue
        files = [channels[c] for c in range(num_channels)]
        data.append({"image": files[0] if num_channels == 1 else files})
    if problems:
        raise ValueError(f"{len(problems)} problem(s) with the images in {dataset_dir}:\n  " + "\n  ".join(problems))
    return data


def predict(dataloader, inferer, network, postprocessing, device):
    """Segment every case: ``inferer`` on the preprocessed image, then ``postprocessing`` per case
    (inversion to the input's grid, argmax, writing). Returns the number of cases."""
    from monai.data import decollate_batch

    network.eval()
    count = 0
    with torch.no_grad():
        for batch in dataloader:
            batch["pred"] = inferer(batch["image"].to(device), network)
            for item in decollate_batch(batch):
                postprocessing(item)
                count += 1
                logger.info("segmented %s", item["image"].meta.get("filename_or_obj", f"case {count}"))
    return count


# ----- several prompts: one label map, as versemi.inference.label_map.compose -----
class LabelMapd(MapTransform):
    """Probabilities (K + 1, X, Y, Z) -> one label map (1, X, Y, Z) of ``values``.

    Channel 0 is the background (the constant 0.5), channel k the probability of the k-th prompt
    of configs/labels.json. A voxel takes ``values[k - 1]`` of its most probable prompt (ties: the
    first) when that probability is > ``threshold``, else 0: the argmax over all channels. The rule
    is applied to the prompt channels themselves, so rounding of the constant channel in the
    stitching and resampling cannot move a voxel across the threshold.
    """

    def __init__(self, keys, values, threshold=0.5, allow_missing_keys=False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.values = [int(v) for v in values]
        self.threshold = float(threshold)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.label_map(d[key])
        return d

    def label_map(self, probabilities):
        values = probabilities.as_tensor() if isinstance(probabilities, MetaTensor) else torch.as_tensor(probabilities)
        if values.shape[0] != len(self.values) + 1:
            raise ValueError(f"the model gave {values.shape[0]} channels; configs/inference.json names "
                             f"{len(self.values)} prompt(s) plus the background: export the bundle again")
        prompts = values[1:]
        best = prompts.argmax(0)
        claimed = prompts.amax(0) > self.threshold
        table = torch.as_tensor(self.values, dtype=torch.int64, device=best.device)
        labels = torch.where(claimed, table[best], torch.zeros_like(best))[None]
        out = MetaTensor(labels)
        return out.copy_meta_from(probabilities) if isinstance(probabilities, MetaTensor) else out


def copy_label_table(bundle_root, relative_path, output_dir):
    """The label map's table of values (``relative_path`` of the bundle) as OUTPUT_DIR/labels.json."""
    os.makedirs(output_dir, exist_ok=True)
    target = os.path.join(output_dir, "labels.json")
    shutil.copyfile(os.path.join(bundle_root, relative_path), target)
    logger.info("wrote %s", target)
    return target


# ----- resampling, as versemi.preprocessing.resampling (kept identical so bundle and versemi_predict agree) -----
ANISOTROPY_RATIO = 3.0


def _anisotropic_axis(spacing):
    spacing = np.asarray(spacing, dtype=float)
    return int(np.argmax(spacing)) if spacing.max() / spacing.min() > ANISOTROPY_RATIO else None


def _zoom_axes(volume, new_shape, order, axes):
    factors = [n / o if a in axes else 1.0 for a, (n, o) in enumerate(zip(new_shape, volume.shape))]
    if all(f == 1.0 for f in factors):
        return volume
    return zoom(volume, factors, order=order, mode="nearest", grid_mode=True)


def _resample_volume(volume, new_shape, order, separate_axis):
    if separate_axis is None:
        return _zoom_axes(volume, new_shape, order, {0, 1, 2})
    in_plane = {0, 1, 2} - {separate_axis}
    volume = _zoom_axes(volume, new_shape, order, in_plane)
    return _zoom_axes(volume, new_shape, 0, {separate_axis})


class ResampleToSpacingd(MapTransform, InvertibleTransform):
    """Resample channel-first (C, X, Y, Z) images to ``pixdim`` (x, y, z) mm the way nnU-Net does.

    The output shape is round(shape * spacing / pixdim) and the grids are aligned at the image
    edges (``scipy.ndimage.zoom`` with ``grid_mode``), third-order splines; when the input or
    the target spacing is anisotropic (one axis > 3x coarser), that axis is resampled on its own
    with nearest neighbour. MONAI's Spacingd keeps the exact target spacing instead, which
    shifts the grid by a fraction of a voxel: enough to change a small structure's boundary. The
    inverse resizes back trilinearly (``F.interpolate``, align_corners False), as versemi_predict
    does with its probabilities.
    """

    def __init__(self, keys, pixdim, allow_missing_keys=False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        # None keeps the image's own spacing along that axis (a 2d model is never resampled across slices)
        self.pixdim = [None if p is None else float(p) for p in pixdim]

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._resample(d[key])
        return d

    def _resample(self, image):
        affine = torch.as_tensor(image.affine, dtype=torch.float64)
        spacing = torch.linalg.norm(affine[:3, :3], dim=0).tolist()
        shape = [int(s) for s in image.shape[1:]]
        pixdim = [sp if t is None else t for sp, t in zip(spacing, self.pixdim)]
        new_shape = [max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, pixdim)]
        array = image.detach().cpu().numpy().astype(np.float32, copy=False)
        if new_shape != shape:
            # versemi works on (z, y, x) arrays: the same axis order here keeps even the anisotropy
            # tie-breaks identical
            spacing_zyx, target_zyx = spacing[::-1], pixdim[::-1]
            axis = _anisotropic_axis(spacing_zyx)
            axis = axis if axis is not None else _anisotropic_axis(target_zyx)
            array = np.stack([_resample_volume(c.transpose(2, 1, 0), new_shape[::-1], 3, axis).transpose(2, 1, 0)
                              for c in array]).astype(np.float32, copy=False)
        scale = [o / n for o, n in zip(shape, new_shape)]
        voxel_map = torch.eye(4, dtype=torch.float64)  # output voxel -> input voxel (edge-aligned grids)
        for a, f in enumerate(scale):
            voxel_map[a, a] = f
            voxel_map[a, 3] = 0.5 * f - 0.5
        meta = self.track_transform_meta(image, sp_size=new_shape, affine=voxel_map, orig_size=shape,
                                         extra_info={"affine": affine}, transform_info=self.get_transform_info())
        out = MetaTensor(torch.from_numpy(np.ascontiguousarray(array)))
        return out.copy_meta_from(meta) if isinstance(image, MetaTensor) else out

    def inverse(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            transform = self.pop_transform(image)
            shape = [int(s) for s in transform[TraceKeys.ORIG_SIZE]]
            values = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            if list(values.shape[1:]) != shape:
                values = F.interpolate(values[None].float(), size=shape, mode="trilinear", align_corners=False)[0]
            out = MetaTensor(values)
            out.copy_meta_from(image)
            out.affine = torch.as_tensor(transform[TraceKeys.EXTRA_INFO]["affine"], dtype=torch.float64).reshape(4, 4)
            d[key] = out
        return d
