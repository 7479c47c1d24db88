from .classifier import Classifier
from .finetune import FineTuner

__all__ = ["Classifier", "FineTuner"]
