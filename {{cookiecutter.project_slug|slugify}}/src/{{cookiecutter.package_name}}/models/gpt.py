"""A decoder-only transformer (GPT), with nanoGPT's names: `n_layer`, `n_head`, `n_embd`, `dropout`, `bias`.

Token and position embeddings; `n_layer` pre-LayerNorm blocks of causal self-attention
(`scaled_dot_product_attention`: the flash kernels on a GPU) and a GELU MLP; a final LayerNorm
and an output head that shares its weights with the token embedding. `forward` takes a key/value
cache, so `generate` feeds each new token alone instead of the whole context again.
"""

import torch
import torch.nn.functional as F
from torch import nn

Cache = list[tuple[torch.Tensor, torch.Tensor]]  # per block: keys and values (batch, heads, tokens, head size)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # queries, keys, values in one product
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, past: tuple | None = None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        # Without a cache, each token sees those before it (is_causal). With one, the new tokens come
        # one at a time after the cached ones and may see all of them: no mask.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=past is None and T > 1
        )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C))), (k, v)


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """LayerNorm -> attention -> add; LayerNorm -> MLP -> add. The unit FSDP shards and checkpoints."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor, past: tuple | None = None):
        y, kv = self.attn(self.ln_1(x), past)
        x = x + y
        return x + self.mlp(self.ln_2(x)), kv


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float = 0.0, bias: bool = False):  # fmt: skip
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        self.block_size = block_size
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab_size, n_embd),
            "wpe": nn.Embedding(block_size, n_embd),
            "drop": nn.Dropout(dropout),
            "h": nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer)),
            "ln_f": nn.LayerNorm(n_embd, bias=bias),
        })  # fmt: skip
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one matrix reads and writes tokens
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled down with depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / (2 * n_layer) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, cache: Cache | None = None):
        """Logits (batch, tokens, vocabulary) for token ids `idx` (batch, tokens), and the new cache.
        With `cache`, `idx` continues the cached tokens: positions go on from theirs."""
        start = 0 if cache is None else cache[0][0].shape[2]
        if start + idx.shape[1] > self.block_size:
            raise ValueError(f"{start + idx.shape[1]} tokens: more than the context of {self.block_size}")
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        new_cache = []
        for i, block in enumerate(self.transformer.h):
            x, kv = block(x, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.lm_head(self.transformer.ln_f(x)), new_cache

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, generator=None):  # fmt: skip
        """Yield `max_new_tokens` token ids (batch, 1), one at a time, each drawn after `idx` and those before it.

        The context is the last `block_size` tokens; once longer, the cache is rebuilt from them
        (positions would run past the embedding), so both ways compute the same logits."""
        cache = None
        for _ in range(max_new_tokens):
            if cache is None or idx.shape[1] > self.block_size:
                logits, cache = self(idx[:, -self.block_size :])
            else:
                logits, cache = self(idx[:, -1:], cache)
            if not use_cache:
                cache = None
            nxt = sample(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat([idx, nxt], dim=1)
            yield nxt


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator=None):
    """One token id per row: the most likely at temperature 0; else drawn from the softmax of
    logits / temperature, kept to the `top_k` most likely and the smallest set of probability `top_p`."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # mass of the likelier ones
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the first always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
