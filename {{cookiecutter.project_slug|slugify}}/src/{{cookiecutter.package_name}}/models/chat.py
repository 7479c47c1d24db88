"""Fine-tune a pretrained chat model (a Hugging Face causal language model) on your conversations.

Supervised fine-tuning (SFT): the model is shown whole conversations and learns to predict the
assistant's tokens only (data/chat.py decides which; their labels are the tokens, all others -100).
With LoRA (`lora_rank` > 0, peft) small low-rank matrices beside every linear layer of the decoder
learn the change and the pretrained weights stay as they are: a checkpoint then holds only the
adapters (a few MB), and everything that reads it (validate, test, resume, generate, export)
rebuilds the model from `model_name_or_path` plus the checkpoint. `lora_rank: 0` trains all weights.

`val/loss` is the mean cross-entropy over the learned tokens of the whole validation set (each
batch adds its sum and count: no logits are kept), `val/ppl` its exponential. At each validation
the model answers a few held-out prompts, shown in TensorBoard's Text tab.

`chat_reply` is the one way to make the model answer: the command line (chat_generate.py), the
Text tab and serving all call it, with the chat template saved in the checkpoint.
"""

import contextlib
import inspect
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from torchmetrics import MeanMetric

from ..chat_template import CHAT_EXTRA, prompt_ids, use_template
from ..errors import UserError
from ..pretrained import load_causal_lm, load_tokenizer, shard_by_layer, transformers
from .fsdp import clip_gradients
from .schedule import warmup_then_cosine

IGNORE = -100  # labels of tokens that are not learned (data/chat.py)

# Lightning lists every pretrained weight a LoRA checkpoint leaves out; on_load_checkpoint checks the adapters.
warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")


def is_lora(key: str) -> bool:
    """Whether state_dict entry `key` is one of peft's LoRA adapter weights."""
    return ".lora_A." in key or ".lora_B." in key


class ChatModel(LightningModule):
    """A pretrained causal language model, fine-tuned with LoRA (default) or all its weights.

    Args:
        model_name_or_path: a model folder (config.json, model.safetensors, tokenizer files) or a Hugging
            Face Hub name; only safetensors weights are loaded, and the repository's own code never runs.
        lora_rank: rank of the LoRA adapters; 0: no adapters, every weight trains (configs/sft_full.yaml).
        lora_alpha: the adapters' output is scaled by lora_alpha / lora_rank.
        lora_dropout: dropout on the adapters' input.
        lora_target_modules: the linear layers that get adapters: 'all-linear' (every linear layer of
            the decoder, not the output layer) or a list of names, e.g. [q_proj, v_proj].
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's weight decay.
        warmup_steps: linear warm-up, then a cosine decay to zero over the run.
        gradient_checkpointing: recompute activations in the backward pass: less memory, about a third slower.
        chat_template: the Jinja chat template; null: the tokenizer's, else the plain one (chat_template.py).
            Filled in when the model is built, so every checkpoint carries the template it was trained with.
        sample_max_new_tokens: length of the answers to held-out prompts in TensorBoard's Text tab (0: none).
    """

    def __init__(
        self,
        model_name_or_path: str = "models/chat",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_target_modules: str | list[str] = "all-linear",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        gradient_checkpointing: bool = False,
        chat_template: str | None = None,
        sample_max_new_tokens: int = 48,
    ):
        super().__init__()
        self.save_hyperparameters()
        # The command line links the data's facts (num_classes, ...) into every model and LightningCLI records
        # them; they are not this model's, and `--ckpt_path` would pass them back to __init__ from the checkpoint.
        own = inspect.signature(ChatModel.__init__).parameters
        for key in [k for k in self.hparams if k not in own and not k.startswith("_")]:
            del self.hparams[key]
        self.model = self.tokenizer = None  # built in configure_model
        self.strict_loading = False  # a LoRA checkpoint leaves out the pretrained weights (see on_load_checkpoint)
        self.token_loss = MeanMetric()  # mean over tokens: each batch's mean weighted by its token count

    @staticmethod
    def prepare_run(config) -> None:
        """Called by the command line before it builds anything: the chat extra must be installed, the
        data's tokenizer is the model's unless --data.tokenizer names another, and under FSDP the decoder
        layer (LlamaDecoderLayer for SmolLM2) is the unit of sharding and activation checkpointing."""
        transformers(CHAT_EXTRA)  # one ERROR line with the install command when the extra is missing
        name = config.model.init_args.model_name_or_path
        if str(name).endswith(".ckpt"):
            raise UserError(
                f"--model.model_name_or_path={name}: a checkpoint, not a Hugging Face model folder"
{%- if cookiecutter.gpt == "yes" %}
                "; a GPT checkpoint of this project becomes one with `python -m {{ cookiecutter.package_name }}.gpt_to_hf "
                f"--ckpt_path {name} --output models/my-gpt`, then give --model.model_name_or_path=models/my-gpt"
{%- else %}
                " (config.json, model.safetensors, tokenizer files)"
{%- endif %}
            )
        data = config.data.get("init_args")
        if data is not None and "tokenizer" in data and not data.tokenizer:
            data.tokenizer = name
        shard_by_layer(config, name)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        h = self.hparams
        model = load_causal_lm(h.model_name_or_path, CHAT_EXTRA)
        if h.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if h.lora_rank:
            import peft

            config = peft.LoraConfig(
                r=h.lora_rank, lora_alpha=h.lora_alpha, lora_dropout=h.lora_dropout,
                target_modules=h.lora_target_modules, task_type="CAUSAL_LM",
            )  # fmt: skip
            try:
                model = peft.get_peft_model(model, config)
            except ValueError as err:
                raise UserError(
                    f"lora_target_modules={h.lora_target_modules}: {str(err).splitlines()[0]} (give the names "
                    "of the model's Linear layers, e.g. [q_proj, v_proj], or all-linear)"
                ) from None
        self.model = model
        self.tokenizer = use_template(load_tokenizer(h.model_name_or_path, CHAT_EXTRA), h.chat_template)
        h.chat_template = self.tokenizer.chat_template  # saved with every checkpoint

    def token_loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed cross-entropy of the batch's learned tokens, and how many there are."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = self.model(**inputs).logits[:, :-1]  # position t predicts token t + 1
        labels = batch["labels"][:, 1:]
        total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return total, (labels != IGNORE).sum()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        total, count = self.token_loss_sum(batch)
        loss = total / count.clamp_min(1)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        total, count = self.token_loss_sum(batch)
        if count:
            self.token_loss.update(total / count, weight=count)

    test_step = validation_step

    def log_token_loss(self, stage: str) -> None:
        loss = self.token_loss.compute()
        self.token_loss.reset()
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}/ppl", loss.exp())

    def on_validation_epoch_end(self) -> None:
        self.log_token_loss("val")
        if not self.trainer.sanity_checking:
            self.show_answers()

    def on_test_epoch_end(self) -> None:
        self.log_token_loss("test")

    def show_answers(self) -> None:
        """The model's answers to the data's held-out prompts, in TensorBoard's Text tab (greedy decoding)."""
        prompts = getattr(self.trainer.datamodule, "prompts", None)
        logger = self.logger
        if not prompts or not self.hparams.sample_max_new_tokens or not isinstance(logger, TensorBoardLogger):
            return
        if not self.trainer.is_global_zero or isinstance(self.trainer.strategy, FSDPStrategy):
            return  # under FSDP each process holds a shard of the weights: one alone cannot generate
        parts = []
        for messages in prompts:
            answer = chat_reply(self, messages, self.hparams.sample_max_new_tokens, temperature=0.0)
            parts.append(f"**{messages[-1]['content']}**\n\n{answer}")
        logger.experiment.add_text("val/answers", "\n\n---\n\n".join(parts), self.global_step)

    configure_gradient_clipping = clip_gradients  # the configs' gradient_clip_val, also under FSDP

    def configure_optimizers(self):
        h = self.hparams
        trained = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=h.lr, weight_decay=h.weight_decay)
        schedule = warmup_then_cosine(optimizer, h.warmup_steps, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.hparams.lora_rank:  # the adapters only: the rest is model_name_or_path's
            state = checkpoint["state_dict"]
            for key in [k for k in state if not is_lora(k)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        have = checkpoint.get("state_dict", {})
        wanted = [k for k in self.state_dict() if is_lora(k) or not self.hparams.lora_rank]
        missing = [k for k in wanted if k not in have and not k.startswith("token_loss")]
        if missing:
            raise UserError(
                f"the checkpoint lacks {len(missing)} of this model's trained weights (e.g. {missing[0]}): "
                "it was written for another model or other LoRA settings"
            )

    def merged(self):
        """The Hugging Face model with any LoRA adapters merged into its weights (a plain transformers model)."""
        return self.model.merge_and_unload() if self.hparams.lora_rank else self.model


def chat_reply(
    module: ChatModel,
    prompt: str | list[dict],
    max_new_tokens: int = 200,
    temperature: float = 0.7,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    on_text=None,
) -> str:
    """The model's answer to `prompt` (a user message, or a whole conversation as a list of messages).

    The prompt is rendered with the checkpoint's chat template (the one it was trained with) and the
    opening of an assistant turn; sampling stops at the EOS or after `max_new_tokens`. temperature 0:
    greedy (always the most likely token). `on_text(piece)` receives the answer as it is generated.
    `seed` makes sampling repeatable without touching the caller's random generators.
    """
    hf = transformers(CHAT_EXTRA)
    tokenizer = module.tokenizer
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    ids = torch.tensor([prompt_ids(tokenizer, messages)], device=module.device)
    streamer = None
    if on_text is not None:

        class Streamer(hf.TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    on_text(text)

        streamer = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    gpus = [module.device.index or 0] if module.device.type == "cuda" else []
    rng = torch.random.fork_rng(devices=gpus) if seed is not None else contextlib.nullcontext()
    with rng, torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        out = module.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **(sampling if temperature > 0 else {"do_sample": False}),
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
