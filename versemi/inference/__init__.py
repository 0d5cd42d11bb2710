"""Prediction with trained folds, in the images' own geometry and format (``versemi_predict``)."""
from __future__ import annotations

from .postprocessing import largest_connected_component
from .predictor import (
    CasePrediction,
    Ensemble,
    FoldModel,
    InputCase,
    LabelMapPrediction,
    find_cases,
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
    "CasePrediction",
    "Ensemble",
    "FoldModel",
    "InputCase",
    "LabelMapPrediction",
    "find_cases",
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
