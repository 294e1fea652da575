"""Hyperparameter search: the space, the Optuna study, and the analysis of finished studies."""
