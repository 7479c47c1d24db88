from .classifier import Classifier
from .text import TextClassifier

__all__ = ["Classifier", "TextClassifier"]
