"""tuned: a persistent, checkpointed hyperparameter-tuning engine and daemon."""

__version__ = "0.1.0"
