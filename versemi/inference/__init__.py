"""Prediction with trained folds, in the images' own geometry and format (``versemi_predict``)."""
from __future__ import annotations

from .postprocessing import largest_connected_component
from .predictor import (
    CHECKPOINT_KINDS,
    CasePrediction,
    Ensemble,
    FoldModel,
    InputCase,
    LabelMapPrediction,
    checkpoint_paths,
    find_cases,
    find_experiment_dir,
    load_models,
    predict_case,
    predict_case_prompts,
    predict_cases,
    prompt_table,
    resolve_prompt,
    resolve_prompts,
    sliding_window_probabilities,
)

__all__ = [
    "CHECKPOINT_KINDS",
    "CasePrediction",
    "Ensemble",
    "FoldModel",
    "InputCase",
    "LabelMapPrediction",
    "checkpoint_paths",
    "find_cases",
    "find_experiment_dir",
    "largest_connected_component",
    "load_models",
    "predict_case",
    "predict_case_prompts",
    "predict_cases",
    "prompt_table",
    "resolve_prompt",
    "resolve_prompts",
    "sliding_window_probabilities",
]
