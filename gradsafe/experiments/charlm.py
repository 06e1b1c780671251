"""A small character-level GPT: tokenizer, model, batched greedy generation with a KV cache, checkpoints.

- ``CharVocab``: a fixed vocabulary, the special tokens ``<pad>`` (0), ``<eos>`` (1, the end of
  an answer) and ``<unk>`` (2), then newline and the 95 printable ASCII characters. Any other
  character is encoded as ``<unk>`` (mapped, not dropped); decoding writes ``<unk>`` as ``?``.
- ``CharGPT``: a pre-LN causal transformer with learned positions (Radford et al. 2019's
  GPT-2 block order: ``x + attn(ln(x))``, ``x + mlp(ln(x))``, a final layer norm, the output
  layer tied to the token embedding). ``forward`` takes an optional ``valid`` mask for
  left-padded batches: positions then count from each row's first real token and padding
  is never attended to, so a left-padded row gives the logits of the same row unpadded.
- ``generate``: greedy decoding of a batch of prompts (left-padded), one forward over the
  prompts then one token per step through the per-layer key/value cache; a row stops at
  ``<eos>``. ``generate(..., cache=False)`` recomputes the whole sequence at every step (the
  reference the cached path is tested against).
- ``save`` / ``load``: one file with the state dict (optionally float16), the model config
  and the vocabulary; ``load`` upcasts to float32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CharVocab", "VOCAB", "PAD", "EOS", "UNK", "GPTConfig", "CharGPT", "generate", "save", "load",
           "CHECKPOINT"]

PAD, EOS, UNK = 0, 1, 2
SPECIALS = ("<pad>", "<eos>", "<unk>")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
CHECKPOINT = Path(__file__).with_name("charlm.pt")


class CharVocab:
    """Characters <-> token ids over a fixed alphabet; unknown characters become ``<unk>``."""

    def __init__(self, chars: str = CHARS) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("the vocabulary's characters must be distinct")
        self.chars = chars
        self.index = {c: i + len(SPECIALS) for i, c in enumerate(chars)}

    def __len__(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, UNK) for c in text]

    def decode(self, ids: Any) -> str:
        """Text of ``ids`` up to the first ``<eos>``; padding is skipped, ``<unk>`` is written ``?``."""
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            i = int(i)
            if i == EOS:
                break
            if i == PAD:
                continue
            out.append("?" if i == UNK else self.chars[i - len(SPECIALS)])
        return "".join(out)


VOCAB = CharVocab()


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = len(VOCAB)
    max_len: int = 128
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    d_ff: int = 512
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")


class Block(nn.Module):
    """One pre-LN transformer block; ``cache`` is this layer's (keys, values) or None."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        p = self.drop.p if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, dropout_p=p)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        x = x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))
        return x, (k, v)


class CharGPT(nn.Module):
    """The character-level GPT (see the module docstring)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        for blk in self.blocks:  # GPT-2's scaled init of the residual projections
            nn.init.normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
            nn.init.normal_(blk.out.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x) @ self.tok.weight.T

    def forward(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, time, vocab) of ``ids`` (batch, time); ``valid``: False at left padding."""
        logits, _ = self._forward(ids, valid, None)
        return logits

    def _forward(self, ids: torch.Tensor, valid: torch.Tensor | None,
                 cache: list[tuple[torch.Tensor, torch.Tensor]] | None
                 ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        b, t = ids.shape
        past = 0 if cache is None else cache[0][0].shape[2]
        if past + t > self.cfg.max_len:
            raise ValueError(f"sequence of {past + t} tokens exceeds the model's max_len {self.cfg.max_len}")
        if valid is None:
            pos = torch.arange(past, past + t, device=ids.device).expand(b, t)
            mask = None
            causal = cache is None
        else:  # valid: (b, past + t) over the cached and the new positions
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)[:, past:]
            qi = torch.arange(past, past + t, device=ids.device)[:, None]
            kj = torch.arange(past + t, device=ids.device)[None, :]
            allowed = (kj <= qi)[None] & valid[:, None, :]
            # a padding query sees itself, so that no row of the softmax is empty
            allowed = allowed | (kj == qi)[None]
            mask = allowed[:, None]
            causal = False
        x = self.tok(ids) + self.pos(pos)
        new_cache = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, mask, causal, None if cache is None else cache[i])
            new_cache.append(kv)
        return self._logits(x), new_cache


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid) of ``prompts`` right-aligned in one tensor."""
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), PAD, dtype=torch.long)
    valid = torch.zeros((len(prompts), t), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, t - len(p):] = torch.tensor(p)
            valid[i, t - len(p):] = True
    return ids, valid


@torch.no_grad()
def generate(model: CharGPT, prompts: list[list[int]], max_new: int = 32, cache: bool = True) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids), each up to its ``<eos>`` (excluded) or ``max_new`` tokens."""
    was_training = model.training
    model.eval()
    ids, valid = left_pad(prompts)
    b = len(prompts)
    max_new = min(max_new, model.cfg.max_len - ids.shape[1])
    out = torch.full((b, max(max_new, 0)), PAD, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    kv = None
    step_ids = ids
    for s in range(max_new):
        if cache:
            logits, kv = model._forward(step_ids, valid, kv)
        else:
            logits, _ = model._forward(ids, valid, None)
        nxt = logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, EOS), nxt)
        out[:, s] = nxt
        done |= nxt == EOS
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones((b, 1), dtype=torch.bool)], dim=1)
        step_ids = nxt[:, None]
    model.train(was_training)
    result = []
    for row in out.tolist():
        result.append(row[: row.index(EOS)] if EOS in row else [t for t in row if t != PAD])
    return result


def save(model: CharGPT, path: str | Path, half: bool = True, extra: dict[str, Any] | None = None) -> None:
    """One file: the state dict (float16 if ``half``), the config, the vocabulary and ``extra``."""
    state = {k: (v.half() if half and v.is_floating_point() else v).clone() for k, v in model.state_dict().items()}
    torch.save({"state": state, "config": asdict(model.cfg), "chars": VOCAB.chars, "specials": list(SPECIALS),
                "extra": extra or {}}, str(path))


def load(path: str | Path = CHECKPOINT) -> tuple[CharGPT, dict[str, Any]]:
    """The model saved at ``path`` in float32 and the file's ``extra``."""
    blob = torch.load(str(path), map_location="cpu", weights_only=True)
    if blob["chars"] != VOCAB.chars or tuple(blob["specials"]) != SPECIALS:
        raise ValueError(f"{path}: the checkpoint's vocabulary differs from charlm.VOCAB")
    model = CharGPT(GPTConfig(**blob["config"]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state"].items()})
    return model, blob["extra"]
