"""Loading pretrained Hugging Face models and tokenizers, with mistakes as one-line errors.

Used by models/text.py (the encoder) and data/text.py (its tokenizer), and by the chat part
(models/chat.py, data/chat.py), which must not import each other. transformers and peft come
with the `text` (or `chat`) extra and are imported only here, on first use: without them
everything else in the project still works.

`name` is a local folder (config.json, the weights, the tokenizer files) or a Hub name such
as `bert-base-chinese`, downloaded once into the Hugging Face cache. With HF_HUB_OFFLINE=1
nothing is downloaded: only folders and models already in the cache load.
"""

import os
from pathlib import Path

import torch

from .errors import UserError, first_line

# The install command named when the packages are missing (the chat part passes its own).
DEFAULT_EXTRA = "pip install -e '.[{% if cookiecutter.text == "yes" %}text{% else %}chat{% endif %}]'"


def transformers(extra: str = DEFAULT_EXTRA):
    """The transformers module, or a UserError with the install command `extra`."""
    try:
        import peft  # noqa: F401  (LoRA; checked together so the message names the whole extra)
        import transformers
    except ImportError as err:
        raise UserError(f"text models need the packages transformers and peft ({first_line(err)}): {extra}") from None
    transformers.logging.set_verbosity_error()  # "Some weights were not initialized ...": the head, on purpose
    transformers.logging.disable_progress_bar()  # a bar per model load
    return transformers


def _not_found(name: str, err: BaseException) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    if Path(name).is_dir():
        why = f"{name}: this folder is not a Hugging Face model ({first_line(err)})"
    elif offline:
        why = f"{name}: no such folder, and HF_HUB_OFFLINE=1 forbids downloading it from the Hub"
    else:
        why = f"{name}: no such folder, and it could not be loaded from the Hugging Face Hub ({first_line(err)})"
    return UserError(
        f"{why}. Put a model folder (config.json, model.safetensors, tokenizer files) on this machine, e.g. "
        f"models/<name>/ (download it once where the Hub is reachable: `hf download <name> --local-dir "
        "models/<name>`; HF_ENDPOINT selects a Hub mirror), and give --model.model_name_or_path=models/<name>"
    )


def load_tokenizer(name: str | None, extra: str = DEFAULT_EXTRA):
    """The (fast) tokenizer of model `name` (a data module's `tokenizer` option, which the CLI fills in)."""
    if not name:
        raise UserError("no tokenizer: set --model.model_name_or_path (or --data.tokenizer) to the model folder")
    hf = transformers(extra)
    try:
        return hf.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as err:
        raise _not_found(name, err) from None


def load_encoder(name: str):
    """The pretrained encoder of model `name` (no task head), in train mode.

    transformers 5 returns models in eval mode and Lightning keeps a module's mode, so without
    `.train()` every Dropout of the encoder would stay off during fine-tuning.
    """
    hf = transformers()
    try:
        # safetensors only: a pickled pytorch_model.bin can run code when it is loaded.
        encoder = hf.AutoModel.from_pretrained(name, use_safetensors=True)
    except (OSError, ValueError, KeyError) as err:
        raise _not_found(name, err) from None
    return encoder.train()


def skeleton(name: str):
    """Model `name`'s architecture without its weights or head (on the meta device: no memory, no weights read)."""
    hf = transformers()
    try:
        config = hf.AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as err:
        raise _not_found(name, err) from None
    with torch.device("meta"):
        return hf.AutoModel.from_config(config)


def layer_class(model: torch.nn.Module) -> type[torch.nn.Module]:
    """The class of a transformer's layers: the members of its longest ModuleList of modules of one
    class (BertLayer, LlamaDecoderLayer, ...)."""
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    stacks = [m for m in stacks if len({type(layer) for layer in m}) == 1]
    if not stacks:
        raise UserError(f"{type(model).__name__}: no stack of transformer layers found to shard with FSDP")
    return type(max(stacks, key=len)[0])


def shard_by_layer(config, name: str) -> None:
    """Under FSDP (the parsed run `config` names FSDPStrategy), make model `name`'s transformer layer the
    unit of sharding and of activation checkpointing: FSDP gathers one layer's weights at a time, and
    the preset's policy names the project's own ViT Block, which a pretrained model does not have."""
    strategy = config.trainer.get("strategy")
    init = getattr(strategy, "init_args", None)
    if init is None or not str(strategy.class_path).endswith("FSDPStrategy"):
        return
    layer = layer_class(skeleton(name))
    init.auto_wrap_policy = {layer}
    if init.get("activation_checkpointing_policy"):  # the preset's choice: [] keeps activations
        init.activation_checkpointing_policy = {layer}
    init.use_orig_params = True  # frozen and trained parameters in one FSDP unit (LoRA, frozen backbone)


def load_causal_lm(name: str, extra: str = DEFAULT_EXTRA):
    """The pretrained causal (decoder-only) language model `name`, with its LM head, in train mode.

    safetensors only, and never the model repository's own Python code (trust_remote_code=False):
    loading a model must not run code from the Hub.
    """
    hf = transformers(extra)
    try:
        model = hf.AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise _not_found(name, err) from None
    return model.train()
