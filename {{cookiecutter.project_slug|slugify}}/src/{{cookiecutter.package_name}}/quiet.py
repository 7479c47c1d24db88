"""Lines that Lightning and PyTorch print on every run and that say nothing about it.

Each one is silenced by its exact message (and the logger or warning category it comes with);
every other line and warning still shows, so anything new (or anything about the run) is seen.
"""

import logging
import re
import warnings

# Lightning prints its information lines (rank_zero_info) through this logger.
LIGHTNING_INFO = "lightning.pytorch.utilities.rank_zero"
NOISE = re.compile(
    r"💡 Tip: .*\[(litlogger|litmodels)\]"  # advertisements for Lightning's cloud services
    r"|Loading `train_dataloader` to estimate number of stepping batches\.$"  # the schedule's length
)


class DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not NOISE.match(record.getMessage())


def quiet() -> None:
    """Silence the known noise (call before the Trainer is built); calling it again changes nothing."""
    logger = logging.getLogger(LIGHTNING_INFO)
    if not any(isinstance(f, DropNoise) for f in logger.filters):
        logger.addFilter(DropNoise())
    # Lightning 2.6 still builds pytree LeafSpecs, which newer torch releases deprecate: not ours to fix.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
