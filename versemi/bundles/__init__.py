"""MONAI bundle export of one prompt of a trained experiment (``versemi_export_bundle``)."""
from __future__ import annotations

from .export import BUNDLE_VERSION, METADATA_SCHEMA, BundleNetwork, export_bundle, inference_config

__all__ = ["BUNDLE_VERSION", "METADATA_SCHEMA", "BundleNetwork", "export_bundle", "inference_config"]
