from .classifier import Classifier
from .finetune import FineTuner
from .regressor import Regressor
from .text import TextClassifier

__all__ = ["Classifier", "FineTuner", "Regressor", "TextClassifier"]
