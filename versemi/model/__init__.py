"""The trained model's home: what training hands on, and what prediction, bundles, evaluation
and the benchmark read.

    plans_view             PlansView: the typed view of plans.json and its configurations
    absent_views           the other datasets' views of a dataset's images where its declared absences are learnt
    config                 TrainingConfig, and effective_configuration: the patch and network after overrides
    augmentation_settings  AugmentationSettings (part of TrainingConfig)
    precision              PRECISIONS, autocast_dtype: the mixed precision a network computes in
    checkpoint             the checkpoint format: its keys, its members, atomic save, load with clear errors
    layout                 where trained models live: results/<experiment>/<trainer>__<configuration>/fold_<f>
    network                every member network rebuilt from a checkpoint, without the trainer that wrote it

Import rules (tests/test_import_rules.py): this package imports neither ``versemi.training`` nor
its readers; ``versemi.inference``, ``versemi.bundles`` and ``versemi.evaluation`` never import
``versemi.training``. Nothing is imported here, so a light import (``model.plans_view``) stays light.
"""
