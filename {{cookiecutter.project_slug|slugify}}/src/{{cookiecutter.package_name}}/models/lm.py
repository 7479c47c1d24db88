"""Pretrain a GPT (models/gpt.py) on text: next-token prediction, in the shape of nanoGPT's train.py.

The loss is the cross-entropy of each next token, in nats per token: guessing uniformly among
V tokens scores ln(V), and `val/ppl` = exp(`val/loss`) is the number of tokens the model is as
unsure between as a uniform guess. AdamW decays the matrices and embeddings only (not LayerNorms
or biases); after a linear warm-up the learning rate follows a cosine to `min_lr`. The
Trainer's clipping, precision, accumulation and strategies apply as to any LightningModule;
`configure_model` builds the network, so FSDP (blocks as units) can build it sharded.

At each validation a sample continues `sample_prompt` and goes to TensorBoard's Text tab.
"""

import math

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from ..errors import UserError
from .gpt import GPT, Block


class GPTModule(L.LightningModule):
    """A GPT language model.

    Args:
        vocab_size, vocab, block_size: from the data (linked by the command line): the tokenizer's
            size, the tokenizer itself as plain values, and the context in tokens.
        n_layer, n_head, n_embd, dropout, bias: the network (nanoGPT's names).
        lr, min_lr, weight_decay, betas, warmup_steps: AdamW and the schedule (warm-up, then cosine to
            min_lr at the run's last step).
        compile: torch.compile the network (faster on a GPU once compiled).
        sample_prompt, sample_tokens: the text sample logged at each validation (sample_tokens 0: none).
    """

    def __init__(self, vocab_size: int = 0, vocab: dict | None = None, block_size: int = 64, n_layer: int = 4,
                 n_head: int = 4, n_embd: int = 128, dropout: float = 0.0, bias: bool = False, lr: float = 1e-3,
                 min_lr: float = 1e-4, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.99),
                 warmup_steps: int = 100, compile: bool = False, sample_prompt: str = "\n",
                 sample_tokens: int = 200):  # fmt: skip
        super().__init__()
        if n_embd % n_head:
            raise UserError(f"--model.n_embd={n_embd} is not divisible by --model.n_head={n_head}; e.g. 128 and 4")
        if vocab_size < 1:
            raise UserError("vocab_size is not set: it comes from the data (configs/gpt_char.yaml, a CorpusDataModule)")
        self.save_hyperparameters()
        self.model: GPT | None = None

    @staticmethod
    def prepare_run(config) -> None:
        """Called by the command line before it builds anything: under FSDP (configs/trainer/fsdp.yaml,
        whose units are the ViT's blocks) each GPT `Block` is the unit of sharding and, unless the preset
        keeps activations ([]), of activation checkpointing."""
        strategy = config.trainer.get("strategy")
        init = getattr(strategy, "init_args", None)
        if init is not None and str(strategy.class_path).endswith("FSDPStrategy"):
            init.auto_wrap_policy = {Block}
            if init.get("activation_checkpointing_policy"):
                init.activation_checkpointing_policy = {Block}

    def configure_model(self) -> None:
        if self.model is None:
            h = self.hparams
            self.model = GPT(h.vocab_size, h.block_size, h.n_layer, h.n_head, h.n_embd, h.dropout, h.bias)
            if h.compile:
                self.model.compile()  # in place: the checkpoint's names stay those of the plain network

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1).float(), y.flatten())

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        # Only on the steps the logger writes, as the classifier: a `self.log` costs Lightning about half a
        # millisecond, a per cent of gpt_char's step on a CPU (benchmarks/gpt.py).
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", loss.exp(), sync_dist=True)  # the epoch mean of exp: read val/loss for exp(mean)
        if batch_idx == 0:
            # Here, not at the epoch's end: under FSDP a step runs inside the sharded model's forward, where
            # the weights outside the blocks (embeddings, head) are gathered; after it they are shards again.
            self.log_sample()

    def log_sample(self) -> None:
        logger = next((lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)  # the data's, through the Trainer
        if logger is None or tokenizer is None or self.trainer.sanity_checking or not self.hparams.sample_tokens:
            return
        # Every process samples (the same text: the same seed), as FSDP's sharded forward needs them all.
        text = self.sample_text(tokenizer, torch.Generator(self.device).manual_seed(0))
        if self.trainer.is_global_zero:  # TensorBoard renders Markdown: indented 4 spaces, the text stays verbatim
            logger.experiment.add_text("val/sample", "    " + text.replace("\n", "\n    "), self.global_step)

    def sample_text(self, tokenizer, generator: torch.Generator) -> str:
        prompt = self.hparams.sample_prompt
        idx = torch.tensor([tokenizer.encode(prompt, "--model.sample_prompt")], device=self.device)
        was_training = self.model.training
        self.model.eval()
        # Not compiled: each new token's cache has a new length, which torch.compile would compile again.
        with torch.compiler.set_stance("force_eager"):
            new = list(self.model.generate(idx, self.hparams.sample_tokens, 0.8, 50, None, True, generator))
        self.model.train(was_training)
        return prompt + tokenizer.decode(torch.cat(new, 1)[0].tolist())

    def configure_optimizers(self):
        h = self.hparams
        optimizer, schedule = optimizer_and_schedule(self.model, h, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def optimizer_and_schedule(model: torch.nn.Module, h, total_steps: int):
    """AdamW with weight decay on matrices and embeddings, and nanoGPT's learning rate per step:
    a linear warm-up over `h.warmup_steps`, then a cosine from `h.lr` down to `h.min_lr` at `total_steps`."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": h.weight_decay},  # matrices, embeddings
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},  # LayerNorms, biases
    ]
    optimizer = torch.optim.AdamW(groups, lr=h.lr, betas=tuple(h.betas))
    warmup = h.warmup_steps

    def factor(step: int) -> float:  # a fraction of lr
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return (h.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (h.lr - h.min_lr)) / h.lr

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
