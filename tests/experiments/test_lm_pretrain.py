"""lm_pretrain: the corpus, a tiny pretraining end to end (function and command line), the loss falls."""

import json
import subprocess
import sys

import pytest
import torch

from gradsafe.experiments import charlm, lm_pretrain as P

TINY = dict(steps=60, batch=8, seq_len=32, d_model=32, n_layers=1, n_heads=2, d_ff=64, eval_every=20, warmup=5,
            eval_windows=16, lr=1e-2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_corpus_split_and_hash():
    c = P.corpus()
    assert len(c["val_topics"]) == 5 and len(c["train"]) > 400_000 and len(c["val"]) > 10_000
    for t in c["val_topics"][1:]:  # no held-out topic's text in the training text (the first opens with its name)
        from pydoc_data.topics import topics
        assert P._ascii(topics[t])[:300] not in c["train"]
    assert len(c["sha256"]) == 64 and c["sha256"] == P.corpus()["sha256"]
    unk = sum(i == charlm.UNK for i in charlm.VOCAB.encode(c["train"]))
    assert unk < 10  # typographic quotes and dashes were written in ASCII


def test_pretrain_tiny_loss_falls():
    model, rec = P.pretrain(P.PretrainConfig(**TINY))
    h = rec["history"]
    assert h["step"] == [20, 40, 60]
    assert h["train_loss"][-1] < h["train_loss"][0] - 0.3 and rec["final_val_loss"] < 3.3
    assert rec["tokens_seen"] == 60 * 8 * 32 and rec["torch"] == torch.__version__
    assert rec["corpus_sha256"] == P.corpus()["sha256"]
    model2, rec2 = P.pretrain(P.PretrainConfig(**TINY))  # deterministic given the seed
    assert rec2["history"]["train_loss"] == h["train_loss"]


def test_command_line_writes_checkpoint_and_record(tmp_path):
    out = tmp_path / "tiny.pt"
    args = ["--out", str(out)] + [a for k, v in TINY.items() for a in ("--" + k.replace("_", "-"), str(v))]
    args[args.index("--steps") + 1] = "20"
    args[args.index("--eval-every") + 1] = "10"
    subprocess.run([sys.executable, "-m", "gradsafe.experiments.lm_pretrain", *args], check=True, capture_output=True,
                   timeout=120)
    record = json.loads((tmp_path / "tiny.pt.json").read_text())
    assert record["steps"] == 20 and record["dtype"] == "float16"
    model, extra = charlm.load(out)
    assert extra["record"]["final_val_loss_shipped"] == record["final_val_loss_shipped"]
    val = torch.tensor(charlm.VOCAB.encode(P.corpus()["val"]))
    assert abs(P.evaluate_loss(model, val, 32) - record["final_val_loss_shipped"]) < 1e-4
