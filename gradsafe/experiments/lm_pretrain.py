"""Pretraining ``charlm.CharGPT`` on English text every Python ships: ``pydoc_data.topics``.

The corpus is the standard library's help topics (79 topics, about 465 KB), joined in
sorted key order with a blank line between topics; typographic quotes and dashes are
written in ASCII first (the vocabulary's other unknown characters become ``<unk>``). Every
``VAL_EVERY``-th topic in that order is held out as validation. Training reads random
windows of ``seq_len + 1`` characters of the training text (next-character loss on all of
them), AdamW with a linear warm-up and a cosine decay.

``python -m gradsafe.experiments.lm_pretrain --out charlm.pt [--steps N ...]`` writes the
checkpoint and, next to it, its record (``<out>.json``: steps, tokens seen, train/val loss,
wall time, torch version, the corpus's SHA-256).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from . import charlm

__all__ = ["PretrainConfig", "corpus", "pretrain", "evaluate_loss", "main", "VAL_EVERY"]

VAL_EVERY = 16  # topics 0, 16, 32, ... (sorted keys) are validation: 5 of 79
ASCII = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...", "\u2014": "--",
         "\u2013": "-", "\t": "    "}


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 6000
    batch: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 1e-4
    warmup: int = 200
    weight_decay: float = 0.1
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    d_ff: int = 512
    seed: int = 0
    eval_every: int = 500
    eval_windows: int = 64  # validation windows per evaluation (the final one reads the whole validation text)
    threads: int = 1


def _ascii(text: str) -> str:
    for a, b in ASCII.items():
        text = text.replace(a, b)
    return text


def corpus() -> dict[str, Any]:
    """The training and validation text, the held-out topics and the SHA-256 of the whole corpus."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    val_keys = keys[::VAL_EVERY]
    train = "\n\n".join(_ascii(topics[k]) for k in keys if k not in val_keys)
    val = "\n\n".join(_ascii(topics[k]) for k in val_keys)
    raw = "\n\n".join(topics[k] for k in keys)
    return {"train": train, "val": val, "val_topics": val_keys,
            "sha256": hashlib.sha256(raw.encode("utf-8")).hexdigest()}


def _windows(data: torch.Tensor, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(len(data) - seq_len - 1, (n,), generator=gen)
    return data[start[:, None] + torch.arange(seq_len + 1)]


@torch.no_grad()
def evaluate_loss(model: charlm.CharGPT, data: torch.Tensor, seq_len: int, windows: int | None = None,
                  gen: torch.Generator | None = None) -> float:
    """Mean next-character loss: on ``windows`` random windows, or on all of ``data`` in disjoint windows (None)."""
    was = model.training
    model.eval()
    if windows is None:
        n = (len(data) - 1) // seq_len
        x = data[: n * seq_len + 1]
        batch = torch.stack([x[i * seq_len: (i + 1) * seq_len + 1] for i in range(n)])
    else:
        batch = _windows(data, windows, seq_len, gen if gen is not None else torch.Generator().manual_seed(0))
    total, count = 0.0, 0
    for chunk in batch.split(64):
        logits = model(chunk[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"))
        count += chunk[:, 1:].numel()
    model.train(was)
    return total / count


def _lr(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def pretrain(cfg: PretrainConfig, log: Any = None) -> tuple[charlm.CharGPT, dict[str, Any]]:
    """Train a ``CharGPT`` on the corpus; return it and its record."""
    torch.set_num_threads(cfg.threads)
    text = corpus()
    train = torch.tensor(charlm.VOCAB.encode(text["train"]), dtype=torch.long)
    val = torch.tensor(charlm.VOCAB.encode(text["val"]), dtype=torch.long)
    torch.manual_seed(cfg.seed)
    model = charlm.CharGPT(charlm.GPTConfig(max_len=cfg.seq_len, d_model=cfg.d_model, n_layers=cfg.n_layers,
                                            n_heads=cfg.n_heads, d_ff=cfg.d_ff))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("pos")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith("pos"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    history: dict[str, list[float]] = {"step": [], "train_loss": [], "val_loss": []}
    t0 = time.perf_counter()
    running, seen = 0.0, 0
    model.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        x = _windows(train, cfg.batch, cfg.seq_len, gen)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += float(loss.detach())
        seen += 1
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            v = evaluate_loss(model, val, cfg.seq_len, cfg.eval_windows)
            history["step"].append(step + 1)
            history["train_loss"].append(running / seen)
            history["val_loss"].append(v)
            if log is not None:
                log(f"step {step + 1}/{cfg.steps}  train {running / seen:.4f}  val {v:.4f}  "
                    f"{time.perf_counter() - t0:.0f}s")
            running, seen = 0.0, 0
    wall = time.perf_counter() - t0
    record = {
        "config": asdict(cfg),
        "model": asdict(model.cfg),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": cfg.steps,
        "tokens_seen": cfg.steps * cfg.batch * cfg.seq_len,
        "train_chars": len(train),
        "val_chars": len(val),
        "val_topics": text["val_topics"],
        "corpus_sha256": text["sha256"],
        "history": history,
        "final_train_loss": evaluate_loss(model, train, cfg.seq_len, 256, torch.Generator().manual_seed(7)),
        "final_val_loss": evaluate_loss(model, val, cfg.seq_len, None),
        "wall_seconds": wall,
        "threads": cfg.threads,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }
    return model, record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gradsafe.experiments.lm_pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="checkpoint path; the record is written to <out>.json")
    p.add_argument("--full-precision", action="store_true", help="save float32 weights (default float16)")
    for f in fields(PretrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    model, record = pretrain(cfg, log=lambda s: print(s, flush=True))
    out = Path(args.out)
    record["dtype"] = "float32" if args.full_precision else "float16"
    charlm.save(model, out, half=not args.full_precision, extra={"record": record})
    if not args.full_precision:  # the validation loss of the weights as shipped
        shipped, _ = charlm.load(out)
        record["final_val_loss_shipped"] = evaluate_loss(shipped, torch.tensor(charlm.VOCAB.encode(corpus()["val"])),
                                                         cfg.seq_len, None)
        charlm.save(model, out, half=True, extra={"record": record})
    out.with_name(out.name + ".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {record['params']} parameters, "
          f"val loss {record['final_val_loss']:.4f}, {record['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
