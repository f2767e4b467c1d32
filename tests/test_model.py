"""The Transformer and the data: invariants, both attention paths, and the authors' checkpoints."""
import dataclasses

import pytest
import torch
from conftest import OFFICIAL, ROOT, needs_official, reference_attention

import transformer
from sequence_datasets import CopyDataset, CycleDataset, make_dataset
from config import HEADS, PAPER, QUICK
from checkpoints import Cell, build_model, load_checkpoint, save_checkpoint
from learners import make_optimizer, train_step
from train import train_cell
from transformer import dropout_keep_mask


def quick_model(heads=4, dropout=QUICK.dropout):
    torch.manual_seed(0)
    return build_model(dataclasses.replace(QUICK, dropout=dropout), heads)


def tokens(n=5, cfg=QUICK, seed=0):
    return torch.randint(0, cfg.vocab_size, (n, cfg.seq_length), generator=torch.Generator().manual_seed(seed))


def test_parameter_count_is_equal_across_head_counts():
    counts = {h: sum(p.numel() for p in build_model(PAPER, h).parameters()) for h in HEADS}
    assert set(counts.values()) == {172_800}


@pytest.mark.parametrize("heads", [1, 4, 16])
def test_attention_rows_sum_to_one_and_are_causal(heads):
    attn = quick_model(heads).attention(tokens())
    assert attn.shape == (5, QUICK.num_layers, heads, QUICK.seq_length, QUICK.seq_length)
    assert torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-6)
    assert torch.all(attn.triu(diagonal=1) == 0)
    assert torch.all(attn[..., 0, 0] == 1)  # the first token sees only itself


def test_logits_are_causal():
    model, x = quick_model().eval(), tokens()
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % QUICK.vocab_size
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :7], model(y)[:, :7], atol=1e-6)
        assert not torch.allclose(model(x)[:, 7:], model(y)[:, 7:])


def test_fused_and_explicit_attention_agree():
    model, x = quick_model().eval(), tokens()
    with torch.no_grad():
        fused, (explicit, _) = model(x), model(x, return_attn=True)
    assert torch.allclose(fused, explicit, atol=1e-5)
    # Training with dropout disabled: the same loss and gradients through both paths. (Not the updated weights:
    # Adam's first step is lr * sign(grad), which float noise flips where a gradient is ~0.)
    target, losses, grads = tokens(seed=1), [], []
    for explicit in (False, True):
        model = quick_model(dropout=0.0).train()
        optimizer = make_optimizer(model.parameters(), QUICK, torch.device("cpu"))
        losses.append(train_step(model, optimizer, x, target, explicit_attention=explicit).item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_datasets():
    copy, cycle = CopyDataset(10, 6, 8, seed=3), CycleDataset(10, 6, 8, seed=3)
    assert torch.equal(copy.targets, copy.inputs) and torch.equal(copy.inputs, cycle.inputs)
    assert torch.equal(cycle.targets[:, 1:], cycle.inputs[:, :-1])
    assert torch.equal(cycle.targets[:, 0], cycle.inputs[:, -1])
    assert torch.equal(make_dataset("copy", 10, 6, 8, 3).inputs, copy.inputs)
    assert not torch.equal(make_dataset("copy", 10, 6, 8, 4).inputs, copy.inputs)
    assert int(copy.inputs.max()) < 8 and len(copy) == 10 and copy[2][0].shape == (6,)
    with pytest.raises(ValueError, match="unknown task"):
        make_dataset("reverse", 10, 6, 8, 3)


OWN = ROOT / "checkpoints"


@pytest.mark.parametrize("folder", [pytest.param(OFFICIAL, marks=needs_official, id="official"),
                                    pytest.param(OWN, id="ours")])
@pytest.mark.parametrize("heads", HEADS)
def test_paper_scale_checkpoints_load_and_solve_both_tasks(folder, heads):
    for task in ("copy", "cycle"):
        model = build_model(PAPER, heads)
        facts = load_checkpoint(model, folder / f"{heads}_heads_{task}.pt")
        if folder == OWN:  # ours record how they were trained
            assert facts["epochs"] == PAPER.epochs and facts["seed"] == 42 and len(facts["losses"]) == PAPER.epochs
            assert facts["sessions"][-1]["last_epoch"] == PAPER.epochs and facts["hardware"]
        data = make_dataset(task, 200, PAPER.seq_length, PAPER.vocab_size, seed=123)
        with torch.no_grad():
            predictions = model.eval()(data.inputs).argmax(-1)
        accuracy = (predictions == data.targets)[:, 1:].float().mean().item()
        assert accuracy >= 0.999, f"{heads} heads, {task}: accuracy {accuracy:.4f}"


SEED_CHECKPOINTS = sorted((OWN / "seeds").glob("seed_*/*_heads_*.pt"))


@pytest.mark.skipif(not SEED_CHECKPOINTS, reason="no seed-study checkpoint committed")
@pytest.mark.parametrize("path", SEED_CHECKPOINTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_seed_study_checkpoints_are_finished_and_solve_their_task(path):
    heads, task = int(path.name.split("_")[0]), path.stem.split("_")[-1]
    model = build_model(PAPER, heads)
    facts = load_checkpoint(model, path)
    assert facts["seed"] == int(path.parent.name.removeprefix("seed_")) and facts["task"] == task
    assert facts["epochs"] == PAPER.epochs == len(facts["losses"]) and facts["sessions"][-1]["last_epoch"] == 200
    data = make_dataset(task, 200, PAPER.seq_length, PAPER.vocab_size, seed=123)
    with torch.no_grad():
        predictions = model.eval()(data.inputs).argmax(-1)
    assert (predictions == data.targets)[:, 1:].float().mean().item() >= 0.999


@needs_official
def test_official_head_count_mismatch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="4-head model but the model expects 8"):
        load_checkpoint(build_model(PAPER, 8), OFFICIAL / "4_heads_copy.pt")
    renamed = tmp_path / "my_model.pt"
    renamed.write_bytes((OFFICIAL / "4_heads_copy.pt").read_bytes())
    with pytest.raises(ValueError, match="head count can only be read"):
        load_checkpoint(build_model(PAPER, 4), renamed)


def test_own_checkpoint_mismatch_and_broken_files_are_refused(tmp_path):
    path = train_cell(dataclasses.replace(QUICK, epochs=1), Cell(4, "copy", folder=tmp_path), progress=False,
                      log=lambda *_: None)
    load_checkpoint(build_model(QUICK, 4), path)  # the right model loads
    with pytest.raises(ValueError, match="num_heads=4 in the file but num_heads=8 expected"):
        load_checkpoint(build_model(QUICK, 8), path)
    with pytest.raises(ValueError, match="embed_dim"):
        load_checkpoint(build_model(PAPER, 4), path)
    truncated = tmp_path / "4_heads_cycle.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="4_heads_cycle.pt could not be read"):
        load_checkpoint(build_model(QUICK, 4), truncated)
    with pytest.raises(FileNotFoundError, match="missing.pt not found"):
        load_checkpoint(build_model(QUICK, 4), tmp_path / "missing.pt")
    foreign = tmp_path / "4_heads_x.pt"
    save_checkpoint(foreign, {"epoch": 3})
    with pytest.raises(ValueError, match="neither a checkpoint of this repo .* nor a plain state_dict"):
        load_checkpoint(build_model(QUICK, 4), foreign)
    save_checkpoint(foreign, {"token_emb.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="does not fit the model"):
        load_checkpoint(build_model(QUICK, 4), foreign)


def test_cpu_training_attention_is_dropout_of_the_explicit_weights(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    keep = torch.rand(2 * 3, 5, 5) > 0.3
    monkeypatch.setattr(transformer, "dropout_keep_mask", lambda shape, p, device=None: keep)
    out = transformer._attention_cpu_dropout(q, k, v, 0.3, causal=True)
    expected = reference_attention(q, k, v, True, keep.view(2, 3, 5, 5), 0.3)
    assert torch.allclose(out.double(), expected, atol=1e-6)


def test_causal_bias_masks_exactly_the_future():
    bias = transformer.causal_bias(5, torch.float32, "cpu")
    assert torch.equal(bias.isinf(), torch.ones(5, 5).triu(1).bool()) and bias.tril().eq(0).all()


def test_dropout_keep_mask_keeps_one_minus_p():
    torch.manual_seed(0)
    kept = dropout_keep_mask((1000, 1000), 0.1).float().mean().item()
    assert abs(kept - 0.9) < 4 * (0.9 * 0.1 / 1e6) ** 0.5
