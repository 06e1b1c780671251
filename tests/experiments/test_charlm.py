"""charlm: the tokenizer, left padding, generation with and without the KV cache, checkpoints, the shipped model."""

import json

import pytest
import torch

from gradsafe.experiments import charlm as C


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=64)
    cfg.update(kw)
    m = C.CharGPT(C.GPTConfig(**cfg)).eval()
    with torch.no_grad():
        for p in m.parameters():  # larger weights than the init: varied, non-constant greedy outputs
            p.normal_(0, 0.3)
    return m


def test_tokenizer_round_trip_and_unknown_characters():
    text = "Hello, World!\n  def f(x): return {'a': [1, 2]} ~`|\\"
    ids = C.VOCAB.encode(text)
    assert C.VOCAB.decode(ids) == text
    assert len(C.VOCAB) == 3 + 96 and min(ids) >= 3
    assert C.VOCAB.encode("caf\u00e9\t") == C.VOCAB.encode("caf") + [C.UNK, C.UNK]  # mapped to <unk>, not dropped
    assert C.VOCAB.decode(C.VOCAB.encode("a\u00e9b")) == "a?b"
    assert C.VOCAB.decode(C.VOCAB.encode("ab") + [C.EOS] + C.VOCAB.encode("cd")) == "ab"  # stops at <eos>
    assert C.VOCAB.decode([C.PAD, *C.VOCAB.encode("ab"), C.PAD]) == "ab"


@pytest.mark.parametrize("dtype_seed", [0, 1, 2])
def test_left_padded_rows_give_the_unpadded_logits(dtype_seed):
    m = _random_model(dtype_seed)
    g = torch.Generator().manual_seed(dtype_seed)
    prompts = [torch.randint(3, len(C.VOCAB), (int(n),), generator=g).tolist()
               for n in torch.randint(1, 20, (5,), generator=g)]
    ids, valid = C.left_pad(prompts)
    full = m(ids, valid)
    for i, p in enumerate(prompts):
        alone = m(torch.tensor([p]))[0]
        torch.testing.assert_close(full[i, -len(p):], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed,batch,max_new", [(0, 1, 10), (1, 7, 25), (2, 16, 40)])
def test_cached_generation_equals_recomputed_generation(seed, batch, max_new):
    m = _random_model(seed)
    g = torch.Generator().manual_seed(100 + seed)
    prompts = [torch.randint(3, len(C.VOCAB), (int(n),), generator=g).tolist()
               for n in torch.randint(1, 15, (batch,), generator=g)]
    fast = C.generate(m, prompts, max_new)
    slow = C.generate(m, prompts, max_new, cache=False)
    assert fast == slow
    assert any(len(x) > 0 for x in fast)
    assert all(len(x) <= max_new for x in fast)


def test_generation_stops_at_eos_and_respects_max_len():
    m = _random_model(3, max_len=24)
    with torch.no_grad():
        m.tok.weight[C.EOS] *= 0  # no <eos>: every row runs to the length limit
    out = C.generate(m, [[5] * 20, [6] * 3], max_new=50)
    assert [len(x) for x in out] == [4, 4]  # max_len 24 - the padded prompt's 20
    with torch.no_grad():  # a model whose every output is <eos>
        for blk in m.blocks:
            blk.out.weight.zero_(); blk.out.bias.zero_(); blk.proj.weight.zero_(); blk.proj.bias.zero_()
        m.tok.weight.zero_(); m.pos.weight.zero_(); m.tok.weight[C.EOS] = 1.0; m.ln.bias.fill_(1.0)
    assert C.generate(m, [[5, 6], [7]], max_new=5) == [[], []]


def test_save_load_round_trip(tmp_path):
    m = _random_model(4)
    C.save(m, tmp_path / "m32.pt", half=False, extra={"note": "x"})
    back, extra = C.load(tmp_path / "m32.pt")
    assert extra == {"note": "x"} and back.cfg == m.cfg
    for (k, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    C.save(m, tmp_path / "m16.pt")  # float16 on disk, float32 after loading
    half, _ = C.load(tmp_path / "m16.pt")
    assert all(p.dtype == torch.float32 for p in half.parameters())
    for (k, a), (_, b) in zip(m.state_dict().items(), half.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    blob = torch.load(tmp_path / "m16.pt", weights_only=True)
    blob["chars"] = blob["chars"][::-1]
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="vocabulary"):
        C.load(tmp_path / "bad.pt")


def test_the_shipped_checkpoint_loads_generates_and_matches_its_record():
    from gradsafe.experiments.lm_pretrain import corpus, evaluate_loss

    assert C.CHECKPOINT.is_file()
    model, extra = C.load()
    record = json.loads(C.CHECKPOINT.with_name(C.CHECKPOINT.name + ".json").read_text())
    assert extra["record"]["final_val_loss_shipped"] == pytest.approx(record["final_val_loss_shipped"])
    params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= params <= 3_000_000 and params == record["params"]
    assert record["corpus_sha256"] == corpus()["sha256"]  # the same text as this Python's pydoc_data
    prompts = [C.VOCAB.encode(s) for s in ("The ", "def ", "In Python, the ")]
    out = [C.VOCAB.decode(g) for g in C.generate(model, prompts, 40)]
    assert all(len(t) >= 20 for t in out)
    letters = sum(ch.isalpha() or ch == " " for t in out for ch in t) / sum(len(t) for t in out)
    assert letters > 0.7  # text, not noise
    assert C.generate(model, prompts, 40) == C.generate(model, prompts, 40, cache=False)
    val = torch.tensor(C.VOCAB.encode(corpus()["val"]))
    loss = evaluate_loss(model, val, record["config"]["seq_len"])
    assert loss == pytest.approx(record["final_val_loss_shipped"], abs=0.02)
    assert loss < 2.0  # far below the uniform 4.6 nats: it has learnt the text
