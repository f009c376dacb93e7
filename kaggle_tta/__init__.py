"""kaggle-tta: test-time-augmentation ensemble inference with a prediction cache."""

__version__ = "0.1.0"
