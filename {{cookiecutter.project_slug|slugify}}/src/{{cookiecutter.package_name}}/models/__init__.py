from .classifier import Classifier
from .finetune import FineTuner
from .regressor import Regressor

__all__ = ["Classifier", "FineTuner", "Regressor"]
