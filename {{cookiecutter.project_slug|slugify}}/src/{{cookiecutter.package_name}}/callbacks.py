"""Callbacks of the default config: the prediction CSV, what TensorBoard shows beyond curves,
and the model summary table.

`PredictionWriter` turns `python train.py predict` into a CSV file, one row per sample.
`TensorBoardViews` adds, at the end of validation, a confusion-matrix image and a grid of
misclassified images, and lists hyperparameters with metrics in the HPARAMS tab. Both are
set in configs/digits_mlp.yaml; each acts only in the subcommands it concerns.
"""

import csv
import importlib.util
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelSummary, RichModelSummary
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from PIL import Image, ImageDraw, ImageFont
from torchmetrics import Metric, MetricCollection

from .errors import rank_zero_print
from .internals import tensorboard_file_writer, validation_log_step
from .models.nets import example_batch


def class_names(pl_module, num_classes: int) -> list[str]:
    names = pl_module.hparams.get("class_names")
    return [str(n) for n in names] if names and len(names) == num_classes else [str(k) for k in range(num_classes)]


class PredictionWriter(BasePredictionWriter):
    """Writes the predictions of `predict` to a CSV file: `id,predicted,probability[,label]`, or for a
    model that predicts numbers (models.Regressor: one value per sample) `id,predicted[,label]`.

    `id` names the sample: its index in the split (MNIST family), its line in the CSV file,
    or the image's path; `predicted` is the most probable class, `probability` its softmax
    probability; `label`, the true class, is there when the predicted data has labels.

    Args:
        output: the CSV file; default: `predictions.csv` in the run's folder (logs/<name>/version_N/).
        write_interval: 'batch': rows go out batch by batch (little memory); 'epoch': all at the end.

    Rows go to a temporary file that takes the place of `output` only when every sample is
    done, so a failed or interrupted run leaves no partial CSV. With several processes
    (DDP) each writes its share; the first gathers them, in sample order, into `output`.
    """

    def __init__(self, output: str | None = None, write_interval: Literal["batch", "epoch"] = "batch"):
        super().__init__(write_interval)
        self.output = output
        self.path: Path | None = None  # the CSV written by the latest run
        self._file = self._writer = None

    def on_predict_start(self, trainer, pl_module) -> None:
        self.path = Path(self.output or os.path.join(trainer.log_dir or ".", "predictions.csv"))
        data = trainer.datamodule
        self.split = getattr(data, "predict_split", None)
        splits = getattr(data, "splits", {})
        labels = splits[self.split][1].cpu() if self.split in splits else None
        # Unknown labels: -1 (classes) or NaN (numbers), as DataModules mark the samples of a predict file.
        known = labels is not None and len(labels) > 0
        if known:
            known = bool(labels.isfinite().all()) if labels.is_floating_point() else int(labels.min()) >= 0
        self.labels = labels if known else None
        self.values = False  # whether the model predicts numbers (one value per sample), from the first batch
        self.ids = data.sample_ids(self.split) if hasattr(data, "sample_ids") else None
        self.names = None  # from the first batch, once the number of classes is known
        self.count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._part = self.path.with_name(f".{self.path.name}.rank{trainer.global_rank}.tmp")
        self._file = open(self._part, "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)

    def _write(self, probs: torch.Tensor, indices) -> None:
        if probs.dim() == 1:  # numbers in the target's units: written as they are, beside the true value
            self.values = True
            for i, v in zip(indices, probs.float().tolist()):
                true = [f"{float(self.labels[i]):.7g}"] if self.labels is not None else []
                self._writer.writerow([i, self.ids[i] if self.ids else str(i), f"{v:.7g}", *true])
            self.count += len(indices)
            return
        best, predicted = probs.float().max(dim=-1)
        if self.names is None:
            self.names = class_names(self._module, probs.shape[-1])
        for i, k, p in zip(indices, predicted.tolist(), best.tolist()):
            row = [i, self.ids[i] if self.ids else str(i), self.names[k], f"{p:.6f}"]
            if self.labels is not None:
                row.append(self.names[int(self.labels[i])])
            self._writer.writerow(row)
        self.count += len(indices)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self._module = pl_module
        self._write(prediction, self._indices(batch_indices, batch_idx, len(prediction), trainer))

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        self._module = pl_module
        for batch_idx, probs in enumerate(predictions):
            given = batch_indices[0][batch_idx] if batch_indices and batch_indices[0] else None
            self._write(probs, self._indices(given, batch_idx, len(probs), trainer))

    @staticmethod
    def _indices(given, batch_idx: int, size: int, trainer) -> list[int]:
        if given is not None and len(given) == size:
            return list(given)
        if trainer.world_size > 1:
            raise RuntimeError("PredictionWriter: the DataLoader does not report its sample indices")
        # One process, no shuffling: batches follow each other (the DataLoader's batch_size).
        start = batch_idx * trainer.predict_dataloaders.batch_size
        return list(range(start, start + size))

    def on_predict_end(self, trainer, pl_module) -> None:
        self._file.close()
        self._file = None
        rows = None
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            with open(self._part, newline="", encoding="utf-8") as f:
                mine = list(csv.reader(f))
            self._part.unlink()
            shares = [None] * trainer.world_size
            dist.all_gather_object(shares, mine)
            rows = {int(r[0]): r for share in shares for r in share}  # a sample seen twice counts once
            rows = [rows[i] for i in sorted(rows)]
        if trainer.is_global_zero:
            self._finish(rows)
            rank_zero_print(
                f"Predictions for {self.count if rows is None else len(rows)} samples written to {self.path}"
            )

    def _finish(self, rows: list[list[str]] | None) -> None:
        """Write header and rows (without the index column) to a new file that replaces `path`."""
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        header = ["id", "predicted"] + ["probability"] * (not self.values) + ["label"] * (self.labels is not None)
        try:
            with open(temporary, "w", newline="", encoding="utf-8") as out:
                writer = csv.writer(out)
                writer.writerow(header)
                if rows is None:
                    with open(self._part, newline="", encoding="utf-8") as f:
                        writer.writerows(row[1:] for row in csv.reader(f))
                else:
                    writer.writerows(row[1:] for row in rows)
                out.flush()
                os.fsync(out.fileno())  # on disk before it takes the name
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)
            self._part.unlink(missing_ok=True)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._file is not None:  # a predict run that did not finish: its rows go
            self._file.close()
            self._file = None
            self._part.unlink(missing_ok=True)


class LayerTable(ModelSummary):
    """Lightning's model summary (the CLI uses it instead of Lightning's own), without the rows of
    the metrics, which have no parameters and compute nothing in the forward pass.

    With the module's `example_input_array` set, the table also lists each layer's input and output
    shapes and FLOPs, counted for that example batch. Rich draws it when installed, as in Lightning.
    """

    def on_fit_start(self, trainer, pl_module) -> None:
        # The metrics, and children that hold only metrics (a regression's `task`): nothing to count.
        self.hidden = {
            name
            for name, module in pl_module.named_children()
            if isinstance(module, (Metric, MetricCollection))
            or (not any(True for _ in module.parameters()) and any(isinstance(m, Metric) for m in module.modules()))
        }
        example = pl_module.example_input_array
        if isinstance(example, torch.Tensor):
            # In the weights' dtype (bf16-true: bfloat16); none under FSDP (the network may run only
            # through FSDP's wrapper) or compile (it hides the layers).
            hide = pl_module.hparams.get("compile") or isinstance(trainer.strategy, FSDPStrategy)
            pl_module.example_input_array = None if hide else example_batch(example.shape[1:], trainer.precision)
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data, *args, **kwargs) -> None:
        keep = [i for i, name in enumerate(dict(summary_data)["Name"]) if name not in self.hidden]
        rows = [(column, [values[i] for i in keep]) for column, values in summary_data]
        rows[0] = (rows[0][0], [str(i) for i in range(len(keep))])  # the row numbers, 0, 1, ...
        draw = RichModelSummary.summarize if importlib.util.find_spec("rich") else ModelSummary.summarize
        draw(rows, *args, **kwargs)


def flatten(params: dict, prefix: str = "") -> dict[str, int | float | str]:
    """Nested hyperparameters as one level of numbers and strings, as TensorBoard's HPARAMS takes them."""
    flat = {}
    for key, value in params.items():
        key = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{key}/"))
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            flat[key] = value
        else:  # True/False, None, lists (class names, input shape), anything else: as text
            flat[key] = str(list(value) if isinstance(value, tuple) else value)
    return flat


def confusion_image(counts: torch.Tensor, names: list[str]) -> Image.Image:
    """Rows: true class, columns: predicted; cells shaded by the share of their row, counts written in."""
    counts = counts.long().cpu()
    n = len(counts)
    font = ImageFont.load_default()
    cell = 28 if n <= 20 else max(4, 560 // n)
    show_names = n <= 50
    label_w = max((int(font.getlength(s)) for s in names), default=0) + 6 if show_names else 0
    left = max(label_w, 40)
    top = label_w + 14
    image = Image.new("RGB", (left + n * cell + 2, top + n * cell + 2), "white")
    draw = ImageDraw.Draw(image)
    draw.text((2, 0), "true \\ predicted", fill="black", font=font)
    share = counts.double() / counts.sum(dim=1, keepdim=True).clamp_min(1)
    for i in range(n):
        for j in range(n):
            v = float(share[i, j])
            shade = int(210 * v)  # the diagonal (right) in blue, mistakes in red
            colour = (255 - shade, 255 - shade // 2, 255) if i == j else (255, 255 - shade, 255 - shade)
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(200, 200, 200))
            if n <= 20 and counts[i, j]:
                text = str(int(counts[i, j]))
                w = font.getlength(text)
                ink = "white" if v > 0.6 else "black"
                draw.text((x0 + (cell - w) / 2, y0 + cell / 2 - 6), text, fill=ink, font=font)
    if show_names:
        for k, name in enumerate(names):
            draw.text((left - label_w + 2, top + k * cell + cell / 2 - 6), name, fill="black", font=font)
            # Column labels: written sideways, bottom to top.
            w = int(font.getlength(name)) + 2
            strip = Image.new("RGB", (w, 14), "white")
            ImageDraw.Draw(strip).text((1, 0), name, fill="black", font=font)
            strip = strip.rotate(90, expand=True)
            image.paste(strip, (left + k * cell + (cell - 14) // 2, top - 2 - w))
    return image


def sample_grid(images: list[torch.Tensor], captions: list[str], columns: int = 4) -> Image.Image:
    """uint8 images (C x H x W) in a grid, each above its caption (lines split at "\\n").

    TensorBoard shrinks an image to fit its card, about 375 x 215 pixels by default: eight
    28 x 28 images (shown at 56 x 56) with two 12-pixel caption lines fit in it at full size.
    """
    font = ImageFont.load_default(size=12)
    c, h, w = images[0].shape
    scale = max(1, 56 // max(h, w))
    lines = max(caption.count("\n") + 1 for caption in captions)
    widest = max(font.getlength(line) for caption in captions for line in caption.split("\n"))
    tile_w, tile_h = max(w * scale, int(widest) + 6), h * scale + 15 * lines + 4
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * tile_w, rows * tile_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, (x, caption) in enumerate(zip(images, captions)):
        pixels = x.permute(1, 2, 0).numpy()
        tile = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels[:, :, :3])
        tile = tile.convert("RGB").resize((w * scale, h * scale), Image.NEAREST)
        x0, y0 = (k % columns) * tile_w, (k // columns) * tile_h
        grid.paste(tile, (x0 + (tile_w - w * scale) // 2, y0))
        draw.multiline_text((x0 + 3, y0 + h * scale + 1), caption, fill="black", font=font, spacing=3)
    return grid


def scatter_image(predicted: torch.Tensor, true: torch.Tensor, size: int = 320) -> Image.Image:
    """Predicted (vertical) against true values (horizontal), both axes over the same range, with
    the diagonal where a perfect model's points would lie."""
    font = ImageFont.load_default()
    lo, hi = float(torch.minimum(predicted.min(), true.min())), float(torch.maximum(predicted.max(), true.max()))
    span = (hi - lo) or 1.0
    left, top, inner = 36, 16, size - 48  # the plot's square: room for the title above, values left and below
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)

    def point(t: float, p: float) -> tuple[float, float]:
        return left + (t - lo) / span * inner, top + inner - (p - lo) / span * inner

    draw.rectangle([*point(lo, hi), *point(hi, lo)], outline=(160, 160, 160))
    draw.line([point(lo, lo), point(hi, hi)], fill=(200, 200, 200))
    for t, p in zip(true.tolist(), predicted.tolist()):
        x, y = point(t, p)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(40, 90, 200))
    draw.text((2, 2), "predicted (up) against true (right)", fill="black", font=font)
    for value, (x, y) in ((lo, point(lo, lo)), (hi, point(hi, lo))):
        draw.text((x - 8, y + 4), f"{value:.4g}", fill="black", font=font)
    draw.text((2, point(lo, hi)[1] - 4), f"{hi:.4g}", fill="black", font=font)
    return image


class TensorBoardViews(Callback):
    """Images at the end of validation, and the HPARAMS tab, for runs logged with TensorBoard.

    `val/confusion_matrix`: rows are the true classes, columns the predicted ones; each cell
    is shaded by its share of the row (the diagonal in blue) and shows its count (up to 20
    classes). `val/misclassified`: validation images the model got wrong, each captioned with its
    true class and, below, `-> predicted` (image data only). For a model that predicts numbers
    (its validation_step returns `predicted` and `target`, as models.Regressor's does):
    `val/predicted_vs_true`, a scatter plot, and `val/residuals`, a histogram of predicted - true
    (this process's share of the validation set). The HPARAMS tab lists the run's
    hyperparameters beside the last value of each metric of `hparams_metrics`.

    Args:
        every_n_epochs: draw the images after every n-th epoch's validation; 0: never.
        misclassified: at most this many images in the grid; 0: no grid.
        hparams_metrics: the metrics listed in the HPARAMS tab; null: those of the Classifier;
            []: no HPARAMS record.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        misclassified: int = 8,
        hparams_metrics: list[str] | None = None,
    ):
        self.every_n_epochs = every_n_epochs
        self.misclassified = misclassified
        default = ["val/acc", "val/f1", "val/loss", "train/loss_epoch", "test/acc", "test/f1", "test/loss"]
        self.hparams_metrics = default if hparams_metrics is None else hparams_metrics
        self._hook = None
        self._logits = None
        self._wrong: list[tuple[torch.Tensor, int, int]] = []
        self._values: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (predicted, true) of a regression

    @staticmethod
    def _tensorboard(trainer) -> TensorBoardLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # TensorBoard keeps the first HPARAMS record of a run and ignores later ones, so this one
        # is written here, before Lightning's own (which lists only hp_metric). It names the
        # metrics; the tab shows the latest value of each, as the run logs them.
        logger = self._tensorboard(trainer)
        if logger is None or stage == "predict" or not self.hparams_metrics or not trainer.is_global_zero:
            return
        if len(list(Path(logger.log_dir).glob("*tfevents*"))) > 1:  # Lightning has opened this run's file
            return  # a resumed run, or an evaluation added to a run: it has its record
        from torch.utils.tensorboard.summary import hparams

        params = flatten({k: v for k, v in pl_module.hparams_initial.items() if not k.startswith("_")})
        data = getattr(trainer.datamodule, "hparams_initial", {})
        params.update(flatten({k: v for k, v in data.items() if not k.startswith("_")}, "data/"))
        writer = tensorboard_file_writer(logger)
        for summary in hparams(params, dict.fromkeys(self.hparams_metrics, 0.0)):
            writer.add_summary(summary)

    def should_draw(self, trainer) -> bool:
        if trainer.sanity_checking or not self.every_n_epochs or self._tensorboard(trainer) is None:
            return False
        return trainer.state.fn != "fit" or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._wrong = []
        self._values = [] if self.should_draw(trainer) and trainer.is_global_zero else None
        if self.misclassified and self.should_draw(trainer) and trainer.is_global_zero:
            # The logits of the validation steps, as the model computes them: no extra forward pass.
            self._hook = pl_module.register_forward_hook(self._keep_logits)

    def _keep_logits(self, module, args, output) -> None:
        self._logits = output

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._values is not None and isinstance(outputs, dict) and "predicted" in outputs:
            self._values.append((outputs["predicted"].detach().float().cpu(), outputs["target"].float().cpu()))
        logits, self._logits = self._logits, None
        need = self.misclassified - len(self._wrong)
        if self._hook is None or need <= 0 or logits is None:
            return
        x, y = batch[0], batch[1]
        if x.dim() != 4 or len(logits) != len(y):  # images only: N x C x H x W
            return
        predicted, self._num_classes = logits.argmax(dim=-1), logits.shape[-1]
        wrong = (predicted != y).nonzero().flatten()[:need]
        if len(wrong):
            # The batch holds pixels in [0, 1] (the model normalises them itself): back to 0-255.
            pixels = (x[wrong].float() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
            self._wrong += zip(pixels, y[wrong].tolist(), predicted[wrong].tolist())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if not self.should_draw(trainer):
            return
        metric = getattr(pl_module, "val_metrics", None)
        counts = None
        if metric is not None and hasattr(metric, "counts"):
            # Runs before the module computes (and resets) the epoch's metrics; the counts
            # of all processes are summed (a collective call: every process takes part).
            with metric.sync_context():
                counts = metric.counts.clone()
        if not trainer.is_global_zero:
            return
        experiment = self._tensorboard(trainer).experiment
        # The step Lightning gives the validation scalars, so that images and curves line up
        # (for `validate` of a checkpoint, the step at which fit logged that epoch's validation).
        step = validation_log_step(trainer)
        trained = getattr(pl_module, "checkpoint_step", None)
        if trainer.state.fn != "fit" and trained is not None:
            step = trained
        if counts is not None:
            names = class_names(pl_module, len(counts))
            image = confusion_image(counts, names)
            experiment.add_image("val/confusion_matrix", np.asarray(image), step, dataformats="HWC")
        if self._wrong:
            images, true, predicted = zip(*self._wrong)
            names = class_names(pl_module, self._num_classes)
            grid = sample_grid(list(images), [f"{names[t]}\n-> {names[p]}" for t, p in zip(true, predicted)])
            experiment.add_image("val/misclassified", np.asarray(grid), step, dataformats="HWC")
        if self._values:
            predicted, true = (torch.cat(parts) for parts in zip(*self._values))
            image = scatter_image(predicted, true)
            experiment.add_image("val/predicted_vs_true", np.asarray(image), step, dataformats="HWC")
            experiment.add_histogram("val/residuals", (predicted - true).numpy(), step)
        self._wrong, self._values = [], None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
