"""The learning-rate and batch-size finders, as callbacks that stack on any run config.

    python train.py fit --config configs/mnist_cnn.yaml --config configs/tune/lr_find.yaml
    python train.py fit --config configs/mnist_cnn.yaml --config configs/tune/batch_size.yaml

Both are Lightning's finders (`LearningRateFinder`, `BatchSizeFinder`): at the start of `fit`
they try a range of values on a copy of the training state, put the model back as it was and
keep the value found, and then the ordinary training run follows with it. Ours add:

- one printed line with what was found;
- the optimizer and its schedule are built again with the value found: Lightning only patches
  the optimizer's current learning rate, which our warm-up/cosine schedule would overwrite at
  its first step, and the cosine schedule's length depends on the batch size;
- the learning-rate finder's loss-vs-lr curve in the run's logs (TensorBoard: SCALARS,
  `lr_find/loss` and `lr_find/lr` by test step, `lr_find/suggested_lr`; TEXT, `lr_find`);
- both are skipped when `fit` resumes from a checkpoint (`--ckpt_path`): the value found the
  first time is in the checkpoint's hyperparameters already.
"""

from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ParallelStrategy

from .errors import UserError, effective_batch_size, rank_zero_print


class LRFinder(LearningRateFinder):
    """Lightning's learning-rate range test on the model's `lr`, before training.

    Args:
        min_lr, max_lr: the range of learning rates tried, exponentially spaced.
        num_training_steps: optimizer steps of the test (one learning rate each).
        early_stop_threshold: stop when the smoothed loss exceeds this many times its best (null: never).
    """

    def __init__(
        self,
        min_lr: float = 1e-6,
        max_lr: float = 1.0,
        num_training_steps: int = 100,
        early_stop_threshold: float | None = 4.0,
    ):
        super().__init__(
            min_lr=min_lr,
            max_lr=max_lr,
            num_training_steps=num_training_steps,
            mode="exponential",
            early_stop_threshold=early_stop_threshold,
            update_attr=True,
            attr_name="lr",
        )
        self.suggestion: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path:
            rank_zero_print("Learning-rate finder: skipped, the run resumes from a checkpoint")
            return
        before = pl_module.hparams.lr
        # The test may need more epochs than the run has (small data): max_steps alone ends it.
        max_epochs, trainer.fit_loop.max_epochs = trainer.fit_loop.max_epochs, -1
        try:
            self.lr_find(trainer, pl_module)
        finally:
            trainer.fit_loop.max_epochs = max_epochs
        if self.optimal_lr is None:  # fast_dev_run
            return
        self.suggestion = self.optimal_lr.suggestion()
        if self.suggestion is None:
            rank_zero_print(
                f"Learning-rate finder: no suggestion (too few finite losses; raise num_training_steps); "
                f"training continues with lr {before:.1e}"
            )
        else:
            trainer.strategy.setup_optimizers(trainer)  # configure_optimizers again, with hparams.lr = suggestion
            rank_zero_print(
                f"Learning-rate finder: suggested lr {self.suggestion:.1e} (was {before:.1e}); "
                "training continues with it"
            )
        self._log_curve(trainer, before)

    def _log_curve(self, trainer, before: float) -> None:
        results = self.optimal_lr.results
        for logger in trainer.loggers:
            for i, (lr, loss) in enumerate(zip(results["lr"], results["loss"])):
                logger.log_metrics({"lr_find/lr": lr, "lr_find/loss": loss}, step=i)
            if self.suggestion is not None:
                logger.log_metrics({"lr_find/suggested_lr": self.suggestion}, step=0)
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                found = "none" if self.suggestion is None else f"{self.suggestion:.3e}"
                logger.experiment.add_text(
                    "lr_find",
                    f"suggested lr {found} (was {before:.3e}); {len(results['lr'])} steps "
                    f"from {results['lr'][0]:.1e} to {results['lr'][-1]:.1e}",
                    global_step=0,
                )
            logger.save()


class BatchFinder(BatchSizeFinder):
    """Lightning's batch-size finder on the data's `batch_size`, before training.

    The batch size is doubled from `init_val` until a step runs out of memory, `max_trials`
    doublings were tried, it reaches `max_val` or the training set's size; 'binsearch' then
    narrows down between the last size that fitted and the first that did not. On a CPU
    nothing runs out of memory: the caps decide.

    Args:
        mode: 'power' (doubling only) or 'binsearch'.
        steps_per_trial: training steps run at each size.
        init_val: the first batch size tried.
        max_trials: the most sizes tried.
        max_val: the largest batch size tried.
        margin: binsearch only: keep this fraction below the largest size found, for safety.
    """

    def __init__(
        self,
        mode: str = "binsearch",
        steps_per_trial: int = 3,
        init_val: int = 32,
        max_trials: int = 10,
        max_val: int = 8192,
        margin: float = 0.05,
    ):
        super().__init__(
            mode=mode,
            steps_per_trial=steps_per_trial,
            init_val=init_val,
            max_trials=max_trials,
            batch_arg_name="batch_size",
            margin=margin,
            max_val=max_val,
        )

    def setup(self, trainer, pl_module, stage=None) -> None:
        if isinstance(trainer.strategy, ParallelStrategy):  # DDP, FSDP, DeepSpeed: one process per device
            raise UserError(
                "the batch-size finder runs on one device only: find the batch size with --trainer.devices=1 "
                "(without the ddp/fsdp config), then train with --data.batch_size=N on all devices"
            )
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path:
            rank_zero_print("Batch-size finder: skipped, the run resumes from a checkpoint")
            return
        before = trainer.datamodule.batch_size if trainer.datamodule is not None else None
        self.scale_batch_size(trainer, pl_module)
        if trainer.fast_dev_run:
            return
        size = self.optimal_batch_size
        if size != before:
            trainer.strategy.setup_optimizers(trainer)  # the schedule's length depends on the batch size
        rank_zero_print(f"Batch-size finder: largest batch that fits: {size}; {effective_batch_size(trainer, size)}")
