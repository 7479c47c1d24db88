"""How does configs/regression_csv.yaml compare with classic regressors on real tables? Prints a table; asserts nothing.

    python benchmarks/regression.py                       # needs scikit-learn (for its tables and baselines only)
    python benchmarks/regression.py --seeds 1 --datasets diabetes

Two real tables that ship inside scikit-learn's wheel (no download):
  diabetes: 442 patients, 10 measurements (age, sex, BMI, blood pressure, six blood serum values),
            target: a measure of disease progression one year later;
  wine-alcohol: 178 Italian wines, 12 chemical measurements (malic acid, ash, ..., proline),
            target: the alcohol content, % by volume (the 13th measurement; the grape class is left out).
For each seed the rows are cut once into train (70 %), validation (10 %) and test (20 %), and every
model gets that same split: the project's run (`fit` with the config as it is, best.ckpt by val/rmse,
then `test` of best.ckpt), and scikit-learn's Ridge (standardised features, alpha 1) and
HistGradientBoostingRegressor (defaults), which train on train + validation (they select nothing on it).
Reported: test RMSE (in the target's units) and R², mean ± sd over the seeds; wall time per fit.
"""

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from {{ cookiecutter.package_name }}.cli import run
from {{ cookiecutter.package_name }}.data.batches import split_indices

ROOT = Path(__file__).resolve().parents[1]
# No TensorBoard images, and no HPARAMS record: `test` runs on the same Trainer after `fit` has closed the run's file.
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--tensorboard.every_n_epochs=0", "--tensorboard.hparams_metrics=[]"]  # fmt: skip


def load(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features, target, feature names) of a table bundled with scikit-learn."""
    from sklearn import datasets

    if name == "diabetes":
        table = datasets.load_diabetes(scaled=False)
        return table.data, table.target, list(table.feature_names)
    table = datasets.load_wine()  # alcohol is the first column
    return table.data[:, 1:], table.data[:, 0], list(table.feature_names[1:])


def write_split(folder: Path, x: np.ndarray, y: np.ndarray, names: list[str], seed: int) -> dict[str, np.ndarray]:
    """train.csv, val.csv and test.csv in `folder` (seeded 70/10/20 cut); returns each split's row indices."""
    val, test, train = (i.numpy() for i in split_indices(len(y), (0.1, 0.2), seed))
    splits = {"train": train, "val": val, "test": test}
    for split, rows in splits.items():
        with open(folder / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*names, "target"])
            writer.writerows([*map(repr, x[i].tolist()), repr(float(y[i]))] for i in rows)
    return splits


def scores(predicted: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    rmse = float(np.sqrt(np.mean((predicted - true) ** 2)))
    return rmse, 1 - float(np.sum((predicted - true) ** 2) / np.sum((true - true.mean()) ** 2))


def ours(folder: Path, extra: list[str]) -> tuple[float, float]:
    """`fit` with configs/regression_csv.yaml on the folder's files, then `test` of best.ckpt."""
    args = [f"--config={ROOT / 'configs' / 'regression_csv.yaml'}", *QUIET, f"--data.path={folder}",
            "--data.label_column=target", f"--trainer.logger.init_args.save_dir={folder / 'logs'}", *extra]  # fmt: skip
    cli = run(["fit", *args])
    result = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)[0]
    return result["test/rmse"], result["test/r2"]


def mean_sd(values, spec: str) -> str:
    spread = f" ± {statistics.stdev(values):{spec}}" if len(values) > 1 else ""
    return f"{statistics.mean(values):{spec}}{spread}"


def sklearn_model(name: str):
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), Ridge(alpha=1.0)) if name == "Ridge" else HistGradientBoostingRegressor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["diabetes", "wine-alcohol"])
    parser.add_argument("--seeds", type=int, default=3, help="splits (and training seeds) 0, 1, ...")
    parser.add_argument("extra", nargs="*", help="options for our run, e.g. --trainer.max_epochs=50")
    args = parser.parse_args()
    rows = [("table", "rows", "model", "test RMSE", "test R²", "s per fit")]
    for name in args.datasets:
        x, y, names = load(name)
        results = {"ours (regression_csv.yaml)": [], "Ridge": [], "HistGradientBoosting": []}
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                splits = write_split(folder, x, y, names, seed)
                started = time.perf_counter()
                rmse, r2 = ours(folder, [f"--seed_everything={seed}", *args.extra])
                results["ours (regression_csv.yaml)"].append((rmse, r2, time.perf_counter() - started))
            fit_rows = np.concatenate([splits["train"], splits["val"]])
            for model_name in ("Ridge", "HistGradientBoosting"):
                started = time.perf_counter()
                model = sklearn_model(model_name).fit(x[fit_rows], y[fit_rows])
                predicted = model.predict(x[splits["test"]])
                results[model_name].append((*scores(predicted, y[splits["test"]]), time.perf_counter() - started))
        for model_name, found in results.items():
            rmse, r2, seconds = zip(*found)
            rows.append((name, str(len(y)), model_name, mean_sd(rmse, ".4g"), mean_sd(r2, ".3f"),
                         f"{statistics.mean(seconds):.2g}"))  # fmt: skip
        ridge = statistics.mean(r[0] for r in results["Ridge"])
        mine = statistics.mean(r[0] for r in results["ours (regression_csv.yaml)"])
        print(f"{name}: our test RMSE is {100 * (mine / ridge - 1):+.1f} % of Ridge's", flush=True)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nTest RMSE and R², mean ± sd over {args.seeds} seeded splits (70/10/20); the same split for every model")
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
