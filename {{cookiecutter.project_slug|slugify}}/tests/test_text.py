"""Text fine-tuning with a tiny, randomly initialised BERT written by the tests (no network):
reading CSV / TSV / JSON Lines, encodings, per-batch padding, fit with LoRA and in full, small
checkpoints, test / predict{% if cookiecutter.export == "yes" %} / export{% endif %} from them, dropout in train mode, FSDP's wrap unit, errors."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

pytest.importorskip("transformers", reason="the text extra is not installed: pip install -e '.[text]'")
pytest.importorskip("peft", reason="the text extra is not installed: pip install -e '.[text]'")

from jsonargparse import Namespace  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from textdata import write_texts, write_tiny_bert  # noqa: E402
from torch import nn  # noqa: E402

from {{ cookiecutter.package_name }}.cli import run  # noqa: E402
from {{ cookiecutter.package_name }}.data.text import TextDataModule  # noqa: E402
from {{ cookiecutter.package_name }}.errors import UserError  # noqa: E402
from {{ cookiecutter.package_name }}.models.text import TextClassifier  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


def text_run(config: str, bert: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / config), f"--model.model_name_or_path={bert}", f"--data.path={data}",
        "--trainer.max_epochs=4", "--model.lr=0.01", "--model.warmup_steps=2", "--data.batch_size=8", *QUIET, *extra,
    ]  # fmt: skip


def test_csv_tsv_and_json_lines_read_alike(tmp_path, bert):
    found = []
    for suffix in (".csv", ".tsv", ".jsonl"):
        data = TextDataModule(path=str(write_texts(tmp_path / f"t{suffix}", 30)), tokenizer=str(bert), max_length=16)
        data.setup("fit")
        found.append((data.class_names, data.samples[0]["train"][0]))
        assert data.input_shape == (2, 16)
    assert found[0][0] == ["negative", "positive"]  # names, sorted
    for names, x in found[1:]:
        assert names == found[0][0] and torch.equal(x, found[0][1])
    x = found[0][1]
    assert (x[:, 0, 0] == 2).all()  # [CLS] first: the tokenizer is the model's (id 2 in the tiny vocabulary)
    assert ((x[:, 0] != 0) == x[:, 1].bool()).all()  # the mask marks exactly the real tokens


def test_batches_are_padded_to_their_longest_text(tmp_path, bert):
    path = tmp_path / "t.csv"
    path.write_text("text,label\ngood,positive\nbad day,negative\nthe food was very good,positive\n")
    data = TextDataModule(path=str(path), tokenizer=str(bert), max_length=32, val_fraction=0, test_fraction=0)
    data.setup("fit")
    x, y = data.splits["train"]
    assert x.shape == (3, 2, 32)
    shortest = x[:, 1].sum(dim=1).argsort()[:2]  # "good" and "bad day" (the split shuffles the rows)
    short, _ = data.on_after_batch_transfer((x[shortest], y[shortest]), 0)
    assert short.shape == (2, 2, 4)  # [CLS] bad day [SEP]
    full, _ = data.on_after_batch_transfer((x, y), 0)
    assert full.shape == (3, 2, 7)  # [CLS] the food was very good [SEP]


def test_encoding(tmp_path, bert):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ngood,positive\ncaf\xe9 bad,negative\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.csv:3: not utf-8 text .*--data.encoding"):
        _ = TextDataModule(path=str(path), tokenizer=str(bert)).samples
    data = TextDataModule(path=str(path), tokenizer=str(bert), encoding="latin-1")
    assert data.num_classes == 2
    with pytest.raises(UserError, match="encoding='klingon'"):
        TextDataModule(path=str(path), encoding="klingon")


@pytest.mark.parametrize(
    ("content", "options", "message"),
    [
        ("text,label\ngood,\n", {}, r"t\.csv:2: the label is empty"),
        ("words,label\ngood,positive\n", {}, r"t\.csv:2: no column 'text'.*--data.text_column"),
        ("text,label\n", {}, r"t\.csv: no rows"),
    ],
)
def test_data_mistakes(tmp_path, bert, content, options, message):
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        _ = TextDataModule(path=str(path), tokenizer=str(bert), **options).samples


def test_bad_json_line_is_named(tmp_path, bert):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "good", "label": "positive"}\n{"text": "bad", \n')
    with pytest.raises(UserError, match=r"t\.jsonl:2: not valid JSON"):
        _ = TextDataModule(path=str(path), tokenizer=str(bert)).samples


class DropoutModes(Callback):
    """Records, at every training step, whether every Dropout of the model is in train mode."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        dropouts = [m for m in pl_module.modules() if isinstance(m, nn.Dropout)]
        self.seen.append(len(dropouts) > 0 and all(m.training for m in dropouts))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, bert):
    """A LoRA fit of the tiny BERT on 120 labelled texts, in its own working directory."""
    root = tmp_path_factory.mktemp("lora")
    data = write_texts(root / "data" / "texts.csv", 120)
    modes = DropoutModes()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run(["fit", *text_run("text_lora.yaml", bert, data)], callbacks=[modes])
    return root, data, modes


def test_lora_fit_writes_small_checkpoints_that_hold_adapters_and_head(lora_run):
    root, _, modes = lora_run
    folder = root / "logs" / "text_lora" / "version_0" / "checkpoints"
    assert (folder / "best.ckpt").is_file() and (folder / "last.ckpt").is_file()
    checkpoint = torch.load(folder / "best.ckpt", weights_only=True)
    keys = list(checkpoint["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k or k.startswith("head.") for k in keys)
    assert {"head.weight", "head.bias"} <= set(keys)
    assert checkpoint["hyper_parameters"]["class_names"] == ["negative", "positive"]
    assert modes.seen and all(modes.seen)  # dropout active in every training step


def test_lora_test_and_predict_rebuild_the_model_from_the_base_folder(lora_run, bert, capsys):
    root, data, _ = lora_run
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        cli = run(["test", *text_run("text_lora.yaml", bert, data), "--ckpt_path=best"])
        accuracy = cli.trainer.callback_metrics["test/acc"].item()
        assert accuracy >= 0.7  # chance is 0.5: the words decide the class, and the fit learned them (0.75 here)
        run(["predict", *text_run("text_lora.yaml", bert, data), "--ckpt_path=best"])
    written = sorted((root / "logs" / "text_lora").glob("version_*/predictions.csv"))
    with open(written[-1], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12  # test_fraction 0.1 of 120
    assert set(rows[0]) == {"id", "predicted", "probability", "label"}
    assert {r["predicted"] for r in rows} <= {"negative", "positive"}
    right = sum(r["predicted"] == r["label"] for r in rows) / len(rows)
    assert abs(right - accuracy) < 1e-6
{%- if cookiecutter.export == "yes" %}


@pytest.mark.parametrize("fmt", ["exported_program", "onnx"])
def test_export_merges_lora_and_saves_the_tokenizer(lora_run, fmt, capsys):
    from transformers import AutoTokenizer

    from {{ cookiecutter.package_name }} import export
    from {{ cookiecutter.package_name }}.text_export import load_text_model

    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    root, _, _ = lora_run
    best = root / "logs" / "text_lora" / "version_0" / "checkpoints" / "best.ckpt"
    out = root / f"model-{fmt}{export.FORMATS[fmt]}"
    assert export.main(["--ckpt_path", str(best), "--format", fmt, "--output", str(out)]) == 0
    assert "vs PyTorch on random token ids" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(out.with_name(f"{out.stem}-tokenizer"))
    batch = tokenizer(["the film was very good", "bad"], return_tensors="pt", padding=True)
    model = load_text_model(best)
    with torch.no_grad():
        expected = model(torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1))
    if fmt == "exported_program":
        got = torch.export.load(out).module()(batch["input_ids"], batch["attention_mask"])
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        inputs = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
        got = torch.from_numpy(session.run(None, inputs)[0])
    assert torch.allclose(got, expected, atol=1e-4)
    names = [n for n, _ in model.inference_network().named_modules()]
    assert not any("lora" in n for n in names)  # merged into the weights
{%- endif %}


def test_full_fine_tune_and_frozen_backbone_checkpoints(tmp_path, bert, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_texts(tmp_path / "texts.csv", 40)
    fast = ["--trainer.max_epochs=1", "--trainer.limit_val_batches=1"]
    run(["fit", *text_run("text_full.yaml", bert, data), *fast])
    full = torch.load(tmp_path / "logs/text_full/version_0/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("backbone.encoder.layer.0.") for k in full)  # every weight trained: all saved
    run(["fit", *text_run("text_full.yaml", bert, data), *fast, "--model.freeze_backbone=true"])
    frozen = torch.load(tmp_path / "logs/text_full/version_1/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert sorted(frozen) == ["head.bias", "head.weight"]


def test_a_checkpoint_for_other_settings_is_refused(lora_run, bert):
    root, data, _ = lora_run
    best = root / "logs" / "text_lora" / "version_0" / "checkpoints" / "best.ckpt"
    model = TextClassifier(model_name_or_path=str(bert), lora_rank=0, num_classes=2)
    with pytest.raises(UserError, match="the checkpoint lacks .* trained weights"):
        model.on_load_checkpoint(torch.load(best, weights_only=True))


def test_fsdp_shards_the_encoder_by_its_transformer_layer(bert):
    from transformers.models.bert.modeling_bert import BertLayer

    strategy = Namespace(
        class_path="lightning.pytorch.strategies.FSDPStrategy",
        init_args=Namespace(auto_wrap_policy=[nn.Linear], activation_checkpointing_policy=[nn.Linear]),
    )
    config = Namespace(
        model=Namespace(class_path="x.TextClassifier", init_args=Namespace(model_name_or_path=str(bert))),
        data=Namespace(class_path="x.TextDataModule", init_args=Namespace(tokenizer=None)),
        trainer=Namespace(strategy=strategy),
    )
    TextClassifier.prepare_run(config)
    assert config.trainer.strategy.init_args.auto_wrap_policy == {BertLayer}
    assert config.trainer.strategy.init_args.activation_checkpointing_policy == {BertLayer}
    assert config.trainer.strategy.init_args.use_orig_params is True
    assert config.data.init_args.tokenizer == str(bert)  # the data's tokenizer is the model's


# In a fresh interpreter after this prelude, `import peft` fails as if it were not installed.
# (transformers cannot be hidden so: torchmetrics imports it whenever its distribution is installed.)
HIDE_PEFT = "import sys; sys.modules['peft'] = None"


def run_main(*args: str, env: dict | None = None, prelude: str = "") -> subprocess.CompletedProcess:
    """`python -c` running the CLI's main with `args` (as `python train.py ARGS` would), after `prelude`."""
    code = f"{prelude}\nimport sys\nfrom {{ cookiecutter.package_name }}.cli import main\nsys.argv[0] = 'train.py'\nmain()"
    pythonpath = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    environment = {**os.environ, "PYTHONPATH": pythonpath, "JSONARGPARSE_DEPRECATION_WARNINGS": "off", **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=environment)


def test_without_the_text_extra_one_error_names_the_install_command(tmp_path):
    data = write_texts(tmp_path / "texts.csv", 10)
    done = run_main(
        "fit", "--config", str(ROOT / "configs" / "text_lora.yaml"), f"--data.path={data}",
        prelude=HIDE_PEFT,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("ERROR")] == [
        "ERROR: text models need the packages transformers and peft (import of peft halted; None in sys.modules): "
        "pip install -e '.[text]'"
    ]


@pytest.mark.parametrize("given", ["hub", "folder"])
def test_a_model_that_cannot_be_loaded_says_where_to_put_one(tmp_path, given):
    data = write_texts(tmp_path / "texts.csv", 10)
    name = "someone/no-such-model" if given == "hub" else str(tmp_path)  # a folder without a model
    done = run_main(
        "fit", "--config", str(ROOT / "configs" / "text_lora.yaml"), f"--data.path={data}",
        f"--model.model_name_or_path={name}", env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 1 and lines[0].startswith(f"ERROR: {name}: "), done.stderr[-2000:]
    assert (
        "HF_HUB_OFFLINE=1 forbids downloading" in lines[0] if given == "hub" else "not a Hugging Face model" in lines[0]
    )
    assert "Put a model folder" in lines[0] and "--model.model_name_or_path=models/<name>" in lines[0]


def test_other_configs_do_not_need_the_text_extra(workdir):
    from conftest import SMALL

    done = run_main(
        "fit", *SMALL, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
        prelude=HIDE_PEFT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ERROR" not in done.stderr
