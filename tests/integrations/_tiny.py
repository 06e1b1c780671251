"""Tiny models and data for the integration tests (built from configs, nothing downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

VOCAB, SEQ = 64, 16


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences; labels = inputs (causal LM)."""

    def __init__(self, n: int = 32, seed: int = 0, low: int = 0, high: int = VOCAB) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(low, high, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def lm_batches(n_batches: int = 2, batch: int = 4, seed: int = 100, low: int = 0, high: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (batch, SEQ), generator=g) for _ in range(n_batches)]


def lm_loss(model):
    def loss(ids):
        return model(input_ids=ids, labels=ids).loss

    return loss
