"""Evaluation of predicted segmentations: per-case metrics with MedPy's conventions and folder
summaries (JSON, CSV, figure). See :mod:`versemi.evaluation.metrics` for how empty masks are scored.
"""
from .metrics import (EMPTY_CONVENTIONS, METRIC_NAMES, CaseMetrics, binary_metrics, dice,
                      directed_surface_distances, jaccard, surface)
from .summary import evaluate_folders, find_cases, format_table_row, summary_table, write_summary

__all__ = ["EMPTY_CONVENTIONS", "METRIC_NAMES", "CaseMetrics", "binary_metrics", "dice", "directed_surface_distances",
           "jaccard", "surface", "evaluate_folders", "find_cases", "format_table_row", "summary_table",
           "write_summary"]
