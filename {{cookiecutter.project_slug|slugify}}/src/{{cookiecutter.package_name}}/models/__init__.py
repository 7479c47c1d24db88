from .classifier import Classifier
from .finetune import FineTuner
from .text import TextClassifier

__all__ = ["Classifier", "FineTuner", "TextClassifier"]
