"""Packed SFT and DPO rows (``data.pack``), in process, no Ray: packing changes where conversations sit, never what
is computed on them. A float64 model on the one-digit-addition task's rendered chats (tests/sft_task.py): the SFT
loss and its gradients, DPO's per-pair log-probs, loss and gradients equal to the unpacked rows'; a conversation's
logits do not move when another conversation of its packed row changes; too-long chats are dropped as unpacked.
The Ray run with ``--set data.pack=true`` is in tests/test_sft.py (it shares that module's Ray instance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import load_config
from jobs.sft import SftConfig, main
from model.llama import ModelArgs, build_model
from model.tokenizer import SentencePieceTokenizer
from sft_task import overrides
from tasks.arithmetic import problems, sft_row
from training.objectives.dpo import dpo_batch_loss, reference_logprobs
from training.objectives.finetune import answer_logprobs, document_mask
from training.objectives.sft import sft_loss
from training.sft_data import (PairRows, SftRows, pack_groups, render_all, render_pair, render_sft_row,
                               save_rendered)

PACK = 160
"""Packed row length: ~4 of the task's chats (~35–45 tokens each) per row."""
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=512,
                 max_seq_len=256, tie_embeddings=True)


@pytest.fixture(scope="module")
def tok(sft_task) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.load(sft_task["tok"])


def model(seed: int = 0) -> torch.nn.Module:
    return build_model(ARGS, seed=seed).double()


def chats() -> list[dict]:
    """16 task chats, two of them multi-turn, so that lengths differ."""
    rows = [sft_row(p) for p in problems(16, seed=5, digits=1, ops="+")]
    turn = [{"role": "user", "content": "And with 2 more?"}, {"role": "assistant", "content": "That makes 2 more."}]
    rows[3] = {"messages": rows[3]["messages"] + turn}
    rows[11] = {"messages": [{"role": "system", "content": "You add numbers."}] + rows[11]["messages"] + turn * 2}
    return rows


@pytest.fixture(scope="module")
def sft_file(tok, tmp_path_factory) -> Path:
    r = render_all(chats(), render_sft_row, tok, 256)
    assert len(r.rows) == 16
    return save_rendered(r, tmp_path_factory.mktemp("pack") / "sft.parquet", ("inputs", "labels"))


@pytest.fixture(scope="module")
def dpo_file(tok, tmp_path_factory) -> Path:
    """Pairs (right answer, wrong answer) with reference log-probs from another model than the policy."""
    rows = [{"prompt": p.prompt, "chosen": f"The answer is {p.reference}.",
             "rejected": f"The answer is {int(p.reference) + 1 + i % 3}." + " Hmm." * (i % 4)}
            for i, p in enumerate(problems(12, seed=6, digits=1, ops="+"))]
    r = render_all(rows, render_pair, tok, 256)
    c, j = reference_logprobs(model(seed=1), r.rows, tok.pad_id or 0)
    return save_rendered(r, tmp_path_factory.mktemp("pack") / "dpo.parquet",
                         ("c_inputs", "c_labels", "r_inputs", "r_labels"), {"ref_chosen": c, "ref_rejected": j})


def everything(rows: SftRows | PairRows) -> dict[str, torch.Tensor]:
    """One batch of all rows of the source."""
    return rows.batch(np.arange(rows.num_rows), torch.device("cpu"))


def grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    return out


def test_pack_groups_first_fit_in_order_with_lanes_packed_in_step():
    sizes = [(6,), (7,), (3,), (4,), (10,), (1,)]
    assert pack_groups(sizes, 10) == [[0, 2, 5], [1], [3], [4]]  # first-fit: 3 and 1 fill row 0's gap
    assert pack_groups(sizes, 10, window=1) == [[0], [1, 2], [3], [4], [5]]  # a window of 1 is next-fit
    # DPO: (chosen, rejected) lengths; a pair joins a row only where both lanes have room
    assert pack_groups([(4, 6), (5, 2), (3, 3), (6, 1), (1, 3)], 10) == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="max_len"):
        pack_groups([(3, 11)], 10)


def test_packed_rows_hold_every_chat_once_with_positions_from_zero(sft_file):
    packed, plain = SftRows(sft_file, 0, PACK), SftRows(sft_file, 0)
    assert plain.num_rows == 16 and packed.num_rows < plain.num_rows / 2
    b = everything(packed)
    assert b["tokens"].shape[1] <= PACK
    doc, pos = b["doc"], b["positions"]
    assert sorted(int(d) for d in doc.unique() if d >= 0) == list(range(16))
    for d in range(16):  # each segment: contiguous, in one row, positions 0 … len-1
        rows, cols = (doc == d).nonzero(as_tuple=True)
        assert rows.unique().numel() == 1 and (cols == torch.arange(cols[0], cols[0] + len(cols))).all()
        assert (pos[rows, cols] == torch.arange(len(cols))).all()


def test_packed_sft_loss_and_gradients_equal_unpacked(sft_file):
    m = model()
    packed, plain = everything(SftRows(sft_file, 0, PACK)), everything(SftRows(sft_file, 0))
    assert (packed["labels"] != -100).sum() == (plain["labels"] != -100).sum()
    loss_packed = sft_loss(m, packed)[0]
    loss_packed.backward()
    g_packed = grads(m)
    loss_plain = sft_loss(m, plain)[0]
    loss_plain.backward()
    torch.testing.assert_close(loss_packed, loss_plain, rtol=1e-12, atol=1e-12)
    for k, g in grads(m).items():
        torch.testing.assert_close(g_packed[k], g, rtol=1e-9, atol=1e-12, msg=k)


def test_packed_dpo_logprobs_loss_and_gradients_equal_unpacked(dpo_file):
    m = model()
    rows = PairRows(dpo_file, 0, PACK)
    packed, plain = everything(rows), everything(PairRows(dpo_file, 0))
    assert rows.num_rows < 6 and packed["tokens"].shape[0] == 2 * rows.num_rows
    order = [j for g in rows.groups for j in g]  # pair of each packed segment
    n = len(order)
    with torch.no_grad():
        got = answer_logprobs(m, packed["tokens"], packed["labels"], packed["doc"], packed["positions"])
        want = answer_logprobs(m, plain["tokens"], plain["labels"])  # (2n,) one row per sequence
    idx = torch.tensor(order)
    torch.testing.assert_close(got, torch.cat([want[:n][idx], want[n:][idx]]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed["ref"], torch.cat([plain["ref"][:n][idx], plain["ref"][n:][idx]]))
    loss_packed, stats_packed = dpo_batch_loss(m, packed, beta=0.5, nll_weight=0.2)
    loss_packed.backward()
    g_packed = grads(m)
    loss_plain, stats_plain = dpo_batch_loss(m, plain, beta=0.5, nll_weight=0.2)
    loss_plain.backward()
    torch.testing.assert_close(loss_packed, loss_plain, rtol=1e-12, atol=1e-12)
    for k in stats_plain:
        torch.testing.assert_close(stats_packed[k], stats_plain[k], rtol=1e-12, atol=1e-12, msg=k)
    for k, g in grads(m).items():
        torch.testing.assert_close(g_packed[k], g, rtol=1e-9, atol=1e-12, msg=k)


def test_reference_logprobs_scored_packed_equal_unpacked(dpo_file):
    ref, pairs = model(seed=1), PairRows(dpo_file).pairs
    torch.testing.assert_close(reference_logprobs(ref, pairs, 0, batch_size=2, pack_len=PACK),
                               reference_logprobs(ref, pairs, 0, batch_size=4), rtol=1e-12, atol=1e-12)


def test_document_mask_keeps_conversations_apart(sft_file):
    m = model().eval()
    b = everything(SftRows(sft_file, 0, PACK))
    doc, pos = b["doc"][:1], b["positions"][:1]  # the first packed row: segments 0, 1, …
    a, other = doc[0] == 0, doc[0] > 0  # conversation A, the rest of the row (pads: -1)
    assert a.any() and other.any()
    with torch.no_grad():
        before = m(b["tokens"][:1], pos, mask=document_mask(doc))
        changed = b["tokens"][:1].clone()
        changed[0, a] = torch.randint(5, 300, (int(a.sum()),), generator=torch.Generator().manual_seed(0))
        after = m(changed, pos, mask=document_mask(doc))
        alone = m(b["tokens"][:1, doc[0] == 1])  # segment 1 in a row of its own, plain causal attention
    assert (after[0, a] - before[0, a]).abs().max() > 1e-6, "changing A should change A's logits"
    torch.testing.assert_close(after[0, other], before[0, other], rtol=0, atol=1e-12)
    torch.testing.assert_close(before[0, doc[0] == 1], alone[0], rtol=1e-10, atol=1e-10)


def test_too_long_chat_is_dropped_as_unpacked(tok, sft_file):
    rows = chats() + [{"prompt": "x " * 300, "response": "2"}]
    r = render_all(rows, render_sft_row, tok, PACK)  # packing starts from the same rendered rows
    assert len(r.rows) == 16 and dict(r.dropped) == {"too_long": 1}
    assert max(len(x) for x, _ in r.rows) <= PACK


@pytest.mark.parametrize("extra, message", [
    ({"data.max_len": -1}, "data.max_len must be >= 0"),
    ({"data.max_len": 9999}, "above the model's context"),
    ({"data.pack": "sometimes"}, "data.pack: expected true/false"),
])
def test_packing_config_errors_before_any_worker(extra, message, sft_task, tmp_path, capsys):
    args = overrides(sft_task, tmp_path, "bad", **{"data.pack": True, **extra})
    assert main(["--config", "sft-tiny", *(f"--set={a}" for a in args)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "metrics").exists()
    assert load_config(SftConfig, "sft-tiny", overrides(sft_task, tmp_path, "ok", **{"data.pack": True})).data.pack
