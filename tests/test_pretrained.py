"""Hugging Face models, offline: tiny random GPT-2, GPT-NeoX, Llama (grouped-query attention, head_dim != hidden /
heads), Gemma 2 (a sliding window shorter than T), Qwen2, Mistral and Gemma 3 built from configs and saved with
save_pretrained. The streamed attention equals the model's own output_attentions, the head weights equal norms
worked out from the state_dict in each layout, no two layers' attention are alive at once, pretrained.py --quick
writes the library's values, and every bad input is one line with nothing written."""
import gc
import hashlib
import importlib.util
import json
import os
import shutil
import threading
import weakref

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub

import hf_models  # noqa: E402
import lm_analysis  # noqa: E402
from config import PAPER  # noqa: E402
from claims import growth_table  # noqa: E402
from lm_analysis import prefix_lengths, summary_counts, summary_lines  # noqa: E402
from evaluation import (layer_study_values, prefix_summary, section4_summary, sink_summary,  # noqa: E402
                        sink_values, synergy_summary, tables56_summary, theorem29_summary, without_first_token)

transformers = pytest.importorskip("transformers")
SIZE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)
T = 12
WINDOW = 4


def tiny_models():
    """{name: (model class, config)}: every layout the module reads."""
    t = transformers
    return {
        "gpt2": t.GPT2LMHeadModel(t.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                               bos_token_id=0, eos_token_id=0)),
        "gpt_neox": t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**SIZE)),
        "llama": t.LlamaForCausalLM(t.LlamaConfig(**SIZE, num_key_value_heads=2, head_dim=16)),
        "gemma2": t.Gemma2ForCausalLM(t.Gemma2Config(**SIZE, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
                                                     layer_types=["sliding_attention", "full_attention"])),
        "qwen2": t.Qwen2ForCausalLM(t.Qwen2Config(**SIZE, num_key_value_heads=2)),
        "mistral": t.MistralForCausalLM(t.MistralConfig(**SIZE, num_key_value_heads=2)),
        "gemma3": t.Gemma3ForCausalLM(t.Gemma3TextConfig(**SIZE, num_key_value_heads=2, head_dim=8)),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for name, model in tiny_models().items():
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def loaded(folders):
    return {name: hf_models.load_causal_lm(folder) for name, folder in folders.items()}


def tokens(samples=2, seed=0):
    return torch.randint(0, 64, (samples, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "llama", "gemma2", "qwen2", "mistral", "gemma3"])
def test_streamed_attention_is_the_models_own(name, loaded):
    model, ids = loaded[name], tokens()
    streamed = {}
    hf_models.stream_attention(model, ids, lambda i, attn: streamed.__setitem__(i, attn.clone()))
    with torch.no_grad():
        reference = model(input_ids=ids, output_attentions=True).attentions
    assert sorted(streamed) == list(range(len(reference))) == [0, 1]
    for layer, attn in streamed.items():
        assert attn.shape == (2, 4, T, T)  # a matrix per query head, grouped-query attention included
        assert torch.allclose(attn, reference[layer], atol=1e-6, rtol=0)
        assert (attn.triu(1) == 0).all()  # causal
        assert torch.allclose(attn.sum(-1), torch.ones(2, 4, T), atol=1e-6)  # row-stochastic
    if name == "gemma2":  # the sliding layer is banded, the global one is not
        assert (streamed[0].tril(-WINDOW) == 0).all() and (streamed[1].tril(-WINDOW) != 0).any()


def test_head_weights_are_the_norms_of_each_layout_by_hand(loaded):
    """GPT-2's c_proj is a Conv1D (weight (in, out)): a head is a block of rows; the others are nn.Linear
    (out, in): a block of columns, of head_dim from the config (16 for the Llama, where hidden / heads is 8)."""
    keys = {"gpt2": ("transformer.h.{}.attn.c_proj.weight", True), "gpt_neox": ("gpt_neox.layers.{}.attention.dense"
            ".weight", False), "llama": ("model.layers.{}.self_attn.o_proj.weight", False),
            **{name: ("model.layers.{}.self_attn.o_proj.weight", False) for name in ("gemma2", "qwen2", "mistral",
                                                                                       "gemma3")}}
    for name, (key, rows) in keys.items():
        state, d = loaded[name].state_dict(), {"llama": 16, "gemma2": 8}.get(name, 8)
        for layer in range(2):
            weight = state[key.format(layer)].double().numpy()
            blocks = [weight[h * d:(h + 1) * d, :] if rows else weight[:, h * d:(h + 1) * d] for h in range(4)]
            norms = np.array([np.sqrt((block ** 2).sum()) for block in blocks])
            assert np.allclose(hf_models.head_weights(loaded[name])[layer], norms / norms.sum(), rtol=1e-12), name
    assert loaded["llama"].state_dict()["model.layers.0.self_attn.o_proj.weight"].shape == (32, 64)


def test_no_two_layers_attention_are_alive_at_once(loaded):
    alive = []

    def on_layer(index, attn):
        gc.collect()
        assert all(ref() is None for ref in alive), f"an earlier layer's attention is alive at layer {index}"
        alive.append(weakref.ref(attn))
    hf_models.stream_attention(loaded["gpt2"], tokens(), on_layer)
    assert len(alive) == 2


def library_tables(model, ids):
    """The studies' rows from the library alone: every layer's attention from output_attentions at once."""
    with torch.no_grad():
        attention = model(input_ids=ids, output_attentions=True).attentions
    weights = hf_models.head_weights(model)
    layers = [layer_study_values(a, weights[i], PAPER, ("section4", "synergy", "theorem29", "prefix"), (8, T))
              for i, a in enumerate(attention)]
    joined = lambda pick: np.concatenate([pick(v) for v in layers], axis=1)
    section4 = {k: joined(lambda v: v["section4"][k]) for k in layers[0]["section4"]}
    values = {p: {k: joined(lambda v: v["head_sets"]["values"][p][k]) for k in ("combined", "parallel", "best_head")}
              for p in ("fidelity", "mixing_time")}
    theorem = {k: joined(lambda v: v["theorem29"][k]) for k in layers[0]["theorem29"]}
    prefix = pd.DataFrame(prefix_summary({n: {k: joined(lambda v: v["prefix"][n][k]) for k in layers[0]["prefix"][n]}
                                          for n in (8, T)}, "random", 4))
    fidelity = values["fidelity"]
    intervals = lm_analysis.exponent_intervals({n: {"mixing": joined(lambda v: v["prefix"][n]["mixing"])}
                                                for n in (8, T)}, seed=5)
    tables = {"section4": pd.DataFrame(section4_summary(section4, "random", 4, "exact")),
              "tables56": lm_analysis.with_holm(pd.DataFrame(tables56_summary("random", 4, fidelity["best_head"],
                                                                              fidelity["combined"]))),
              "prefix": prefix.merge(growth_table(prefix)[["layer", "growth", "beta"]], on="layer").merge(
                  pd.DataFrame({"layer": [1, 2], **intervals}), on="layer"),
              "synergy": lm_analysis.with_holm(pd.DataFrame(synergy_summary(
                  "random", 4, values, joined(lambda v: v["head_sets"]["diversity"]))), by="proxy"),
              "theorem29": pd.DataFrame(theorem29_summary(theorem, "random", 4))}
    for table in tables.values():
        table.insert(3, "layer_kind", "full")
    return tables


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_pretrained_quick_writes_the_librarys_values(name, folders, loaded, run_ok, tmp_path):
    out = run_ok("pretrained.py", "--model", folders[name], "--quick", "--input", "random", "--length", T,
                 "--out", tmp_path, "--seed", 5)
    folder = tmp_path / folders[name].name / "random"
    assert "theorem29:" in out and {p.name for p in folder.iterdir()} >= {
        f"{s}.{ext}" for s in ("section4", "tables56", "synergy", "theorem29", "prefix") for ext in
        ("csv", "md", "png", "pdf")} | {"tokens.csv"}
    ids = torch.tensor([[int(x) for x in row.split()] for row in pd.read_csv(folder / "tokens.csv").token_ids])
    assert ids.shape == (3, T) and torch.equal(ids, torch.randint(0, 64, (3, T),
                                                                  generator=torch.Generator().manual_seed(5)))
    for study, table in library_tables(loaded[name], ids).items():
        written = pd.read_csv(folder / f"{study}.csv")
        pd.testing.assert_frame_equal(written, table, check_dtype=False, rtol=1e-9)
    prefix = pd.read_csv(folder / "prefix.csv")
    assert sorted(prefix.n.unique()) == [8, T] and set(prefix.growth) == {"too few lengths"}
    assert len(pd.read_csv(folder / "tables56.csv")) == 2 and len(prefix) == 4


@pytest.fixture(scope="module")
def with_tokenizer(folders, tmp_path_factory):
    """The GPT-2 folder with a word-level tokenizer built in code (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    folder = tmp_path_factory.mktemp("tok") / "gpt2_words"
    shutil.copytree(folders["gpt2"], folder)
    words = [f"w{i}" for i in range(63)]
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_text_input_goes_through_the_tokenizer(with_tokenizer, tmp_path, run_ok):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 63}" for i in range(40)))
    run_ok("pretrained.py", "--model", with_tokenizer, "--quick", "--input", "text", "--text", text, "--length", T,
           "--studies", "section4", "--out", tmp_path / "out")
    ids = pd.read_csv(tmp_path / "out" / "gpt2_words" / "text" / "tokens.csv").token_ids
    first = [int(x) for x in ids[0].split()]
    assert first == list(range(1, T + 1))  # w0 w1 ... at the start of the file: ids 1, 2, ...
    assert {p.stem for p in (tmp_path / "out" / "gpt2_words" / "text").glob("*.csv")} == {"tokens", "samples",
                                                                                        "section4"}


def bad_inputs(folders, with_tokenizer, tmp):
    """(arguments, what the one-line error says) for every bad input of the issue."""
    empty = tmp / "no_config"
    empty.mkdir(exist_ok=True)
    mamba = tmp / "mamba"
    mamba.mkdir(exist_ok=True)
    (mamba / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    short = tmp / "short.txt"
    short.write_text("w1 w2 w3")
    return [(["--model", "no-such-owner/no-such-model"], "could not load 'no-such-owner/no-such-model'"),
            (["--model", empty], "has no config.json"),
            (["--model", mamba], "architecture 'mamba' is not supported"),
            (["--model", folders["gpt2"], "--length", 65], "beyond the 64 positions"),
            (["--model", folders["llama"], "--length", 65], "beyond the 64 positions"),  # max_position_embeddings
            (["--model", folders["gpt2"], "--length", 3], "--length must be at least 4"),
            (["--model", with_tokenizer, "--input", "text", "--text", short, "--length", T],
             "fewer than the 12 a sample of --length 12"),
            (["--model", folders["gpt2"], "--input", "text", "--text", short], "has no tokenizer"),
            (["--model", folders["gpt2"], "--studies", "section4,nonsense"], "--studies: expected")]


def test_bad_input_is_one_line_and_writes_nothing(folders, with_tokenizer, tmp_path, run_main):
    for args, message in bad_inputs(folders, with_tokenizer, tmp_path):
        code, _, err = run_main("pretrained.py", *args, "--quick", "--out", tmp_path / "out")
        lines = [line for line in err.strip().splitlines() if "error:" in line]
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, err[-500:])
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_without_first_token_by_hand():
    """Position 0 dropped, each query's attention to the rest renormalised: the rows of a 3-token head by hand."""
    attn = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.5, 0.2, 0.3]], dtype=torch.float64)
    assert torch.allclose(without_first_token(attn), torch.tensor([[1.0, 0.0], [0.4, 0.6]], dtype=torch.float64))
    alone = without_first_token(torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(alone, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # query 2 attended to position 0 alone


def test_the_variant_without_position_0_end_to_end(folders, loaded, run_ok, tmp_path):
    """--without-first-token writes the same studies on the DAG without position 0, beside the full one."""
    run_ok("pretrained.py", "--model", folders["gpt_neox"], "--quick", "--input", "random", "--length", T,
           "--studies", "section4", "--without-first-token", "--out", tmp_path)
    folder = tmp_path / "gpt_neox" / "random"
    ids = torch.tensor([[int(x) for x in row.split()] for row in pd.read_csv(folder / "tokens.csv").token_ids])
    with torch.no_grad():
        attention = loaded["gpt_neox"](input_ids=ids, output_attentions=True).attentions
    weights = hf_models.head_weights(loaded["gpt_neox"])
    for name, read in (("", lambda a: a), ("without_first_token", without_first_token)):
        values = [layer_study_values(read(a), weights[i], PAPER, ("section4",))["section4"]
                  for i, a in enumerate(attention)]
        joined = {k: np.concatenate([v[k] for v in values], axis=1) for k in values[0]}
        expected = pd.DataFrame(section4_summary(joined, "random", 4, "exact"))
        expected.insert(3, "layer_kind", "full")
        pd.testing.assert_frame_equal(pd.read_csv(folder / name / "section4.csv"), expected, check_dtype=False,
                                      rtol=1e-9)


@pytest.mark.parametrize("study", ["section4", "tables56", "synergy", "theorem29", "prefix", "sink"])
def test_each_study_alone(study, folders, run_ok, tmp_path):
    run_ok("pretrained.py", "--model", folders["gpt2"], "--quick", "--input", "random", "--length", T, "--studies",
           study, "--out", tmp_path)
    folder = tmp_path / "gpt2" / "random"
    assert {p.stem for p in folder.glob("*.csv")} == {"tokens", "samples", study}
    assert sorted(pd.read_csv(folder / f"{study}.csv").layer.unique()) == [1, 2]


def test_boundaries_of_length(folders, with_tokenizer, run_ok, tmp_path):
    """--length 4 (the least), a length at the model's 64 positions, and a text of exactly --length tokens (every
    window is the whole text); the prefix lengths at 16 and just above."""
    assert prefix_lengths(16) == [8, 16] and prefix_lengths(17) == [16, 17] and prefix_lengths(4) == [4]
    assert prefix_lengths(1024) == [16, 32, 64, 128, 256, 512, 1024]
    for length in (4, 64):
        run_ok("pretrained.py", "--model", folders["gpt2"], "--quick", "--length", length, "--studies", "section4",
               "--out", tmp_path / str(length))
        ids = pd.read_csv(tmp_path / str(length) / "gpt2" / "repeat" / "tokens.csv").token_ids
        assert [len(row.split()) for row in ids] == [length] * 3
    text = tmp_path / "exact.txt"
    text.write_text(" ".join(f"w{i}" for i in range(T)))
    run_ok("pretrained.py", "--model", with_tokenizer, "--quick", "--input", "text", "--text", text, "--length", T,
           "--studies", "section4", "--out", tmp_path / "exact")
    ids = pd.read_csv(tmp_path / "exact" / "gpt2_words" / "text" / "tokens.csv").token_ids
    assert list(ids) == [" ".join(str(i + 1) for i in range(T))] * 3
    facts = json.loads((tmp_path / "exact" / "gpt2_words" / "text" / "run.json").read_text())
    assert facts["text_file"] == text.name and facts["text_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert facts["text_source"] == "--text" and facts["model"] == "gpt2_words" and facts["file"] is None


def test_every_study_without_position_0_counts_its_prefixes_without_it(folders, run_ok, tmp_path):
    """--without-first-token on every study: T - 1 = 12 positions, so the prefix lengths 8 and 12 (T - 1 itself),
    and the same files as the paper's DAG beside it."""
    run_ok("pretrained.py", "--model", folders["llama"], "--quick", "--input", "random", "--length", T + 1,
           "--without-first-token", "--out", tmp_path)
    full, without = tmp_path / "llama" / "random", tmp_path / "llama" / "random" / "without_first_token"
    assert sorted(pd.read_csv(full / "prefix.csv").n.unique()) == [8, T + 1]
    assert sorted(pd.read_csv(without / "prefix.csv").n.unique()) == [8, T]
    assert {p.name for p in full.glob("*.csv")} == {p.name for p in without.glob("*.csv")}
    assert (pd.read_csv(without / "sink.csv").first_token_mean > 0).all()
    figures = {p.name for p in full.glob("*.png")}
    assert figures == {p.name for p in without.glob("*.png")} and len(figures) == 6  # a figure of its own, each
    assert json.loads((full / "run.json").read_text())["first_token"] is True
    assert json.loads((without / "run.json").read_text())["first_token"] is False


def test_reproduce_plans_the_real_results_then_the_sink_protocol_with_configs_settings(monkeypatch):
    """--reproduce: config.REAL_RESULTS (every study, both DAGs, 16 samples), config.SINK_PROTOCOL, the gradient
    study (config.GRADIENT_RUNS) and the quantisation study (config.QUANTISATION_RUNS), as config sets them."""
    import pretrained
    from config import GRADIENT_RUNS, QUANTISATION_RUNS, REAL_RESULTS, SINK_PROTOCOL
    from evaluation import STUDIES
    monkeypatch.setattr("sys.argv", ["pretrained.py", "--reproduce"])
    parser, args = pretrained.parse_args()
    real, sink, gradient, quantisation = pretrained.plan_of(parser, args)
    assert (real.models, real.inputs, real.length, real.samples, real.without_first_token, real.out) == (
        REAL_RESULTS.models, REAL_RESULTS.inputs, REAL_RESULTS.length, REAL_RESULTS.samples, True, REAL_RESULTS.out)
    assert real.studies == (REAL_RESULTS.studies or STUDIES) and real.studies == STUDIES and real.samples == 16
    assert (sink.models, sink.inputs, sink.length, sink.samples, sink.studies, sink.out) == (
        SINK_PROTOCOL.models, SINK_PROTOCOL.inputs, SINK_PROTOCOL.length, SINK_PROTOCOL.samples,
        SINK_PROTOCOL.studies, SINK_PROTOCOL.out) and sink.studies == ("sink",)
    assert gradient == GRADIENT_RUNS and gradient.studies == ("gradient",) and not gradient.quantisers
    assert quantisation.quantisers == ("Q8_0", "Q5_0", "Q4_0") and quantisation.inputs == ("prose",)
    assert quantisation.studies == STUDIES and quantisation.out == QUANTISATION_RUNS.out


def test_summary_counts_wins_and_losses_apart():
    """A tables56 row wins with more than half the decided samples and p < 0.05, loses with fewer; an even split or
    p = 0.05 is neither; synergy of each sign likewise at Wilcoxon p < 0.05; each count again with the Holm-adjusted
    p-values (p_holm, written here by hand); the sink's share and attention averaged over the layers, the share over
    the queries that see position 0 over full and sliding layers apart."""
    tables56 = pd.DataFrame({"layer": [1, 2, 3, 4, 5], "samples": 8, "ties": [0, 0, 2, 0, 0], "wins": [8, 0, 3, 7, 8],
                             "win_rate": [1, 0, 0.375, 0.875, 1], "p_value": [0.0078, 0.0078, 1.0, 0.05, 0.0078],
                             "p_holm": [0.039, 0.039, 1.0, 0.1, 0.06]})
    synergy = pd.DataFrame({"layer": [1, 2, 3, 4, 1], "proxy": ["fidelity"] * 4 + ["mixing_time"],
                            "synergy": [0.2, -0.1, 0.3, 0.1, 0.5], "p_value": [0.01, 0.04, 0.05, 0.02, 0.01],
                            "p_holm": [0.04, 0.08, 0.1, 0.06, 0.01]})
    sink = pd.DataFrame({"layer": [1, 2, 3, 4, 5],
                         "layer_kind": ["sliding 4", "full", "sliding 4", "sliding 4", "full"],
                         "sink_share": [0.25, 0.75, 0, 0.5, 1], "first_token_mean": [0.1, 0.3, 0.05, 0.2, 0.6],
                         "sink_share_visible": [0.5, 0.75, 0.25, 0.75, 1]})
    tables = {"tables56": tables56, "synergy": synergy, "sink": sink}
    counts = summary_counts(tables)
    assert (counts["wins"], counts["losses"], counts["synergy_positive"], counts["synergy_negative"]) == (2, 1, 2, 1)
    assert (counts["wins_holm"], counts["losses_holm"], counts["synergy_positive_holm"],
            counts["synergy_negative_holm"]) == (1, 1, 1, 0)
    assert counts["layers"] == 5 and counts["win_rate_mean"] == pytest.approx(3.25 / 5)
    assert counts["sink_share"] == pytest.approx(0.5) and counts["first_token_mean"] == pytest.approx(0.25)
    assert counts["sink_share_visible"] == pytest.approx(0.65) and counts["sliding_layers"] == 3
    assert counts["sink_share_full"] == pytest.approx(0.875) and counts["sink_share_sliding"] == pytest.approx(0.5)
    lines = summary_lines(tables)
    assert "in 2 of 5 layers (1 after Holm's correction), loses to it in 1 (1)" in lines[0]
    assert "in 2 of 4 layers (1 after Holm's correction), < 0 in 1 (0)" in lines[1]
    assert "sink: 50.0% of heads put more than 0.3 of their attention on position 0" in lines[2]
    assert "mean attention there 0.250; over the queries that see it, 87.5% in full layers and 50.0% in 3" in lines[2]


def test_sink_values_and_summary_by_hand():
    """Two samples of one layer, two heads, T = 4. Position 0 gets 0.6 of every later query of a sink head (mean over
    the 4 queries: (1 + 3 x 0.6) / 4 = 0.7) and nothing from a later query of the other (1 / 4 = 0.25). Sample 0:
    a sink head and a plain one; sample 1: two plain ones. With a window of 2, only queries 0 and 1 see position 0:
    the sink head's score over them is (1 + 0.6) / 2 = 0.8, the plain one's (1 + 0) / 2 = 0.5."""
    plain = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, .5, .5, 0], [0, 1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    sink = torch.tensor([[1, 0, 0, 0], [.6, .4, 0, 0], [.6, .2, .2, 0], [.6, .4 / 3, .4 / 3, .4 / 3]],
                        dtype=torch.float64)
    attn = torch.stack([torch.stack([sink, plain]), torch.stack([plain, plain])])
    values = sink_values(attn)
    assert np.allclose(values["first_token"], [[0.7, 0.25], [0.25, 0.25]]) and np.allclose(values["share"], [0.5, 0])
    assert np.array_equal(values["first_token_visible"], values["first_token"])  # a full layer: the same score
    windowed = sink_values(attn, window=2)
    assert np.allclose(windowed["first_token"], values["first_token"])
    assert np.allclose(windowed["first_token_visible"], [[0.8, 0.5], [0.5, 0.5]])
    assert np.allclose(windowed["share_visible"], [1, 1])
    row, = sink_summary({k: v[:, None] for k, v in windowed.items()}, "prose", 2)
    expected = {"task": "prose", "heads": 2, "layer": 1, "sink_share": 0.5, "sink_share_per_sample_mean": 0.25,
                "sink_share_per_sample_std": 0.25, "first_token_mean": 0.3625, "sink_share_visible": 1.0,
                "first_token_visible_mean": 0.575, "head_1": 0.475, "head_2": 0.25}
    assert row.keys() == expected.keys() and all(row[k] == pytest.approx(v) for k, v in expected.items())


def test_a_sliding_layer_is_read_from_the_config_and_its_sink_over_the_queries_that_see_position_0(loaded):
    """The tiny Gemma 2's layers: sliding (window 4) then full, as its config says; in the sliding one position 0
    gets attention from queries 0-3 and none from later ones (the mask), and the score over the visible queries is
    the mean over those 4, by hand; in the full layer the two scores are one."""
    model = loaded["gemma2"]
    assert hf_models.layer_windows(model.config) == [WINDOW, None]
    assert hf_models.layer_windows(transformers.GPT2Config(n_layer=3)) == [None] * 3
    assert hf_models.layer_windows(transformers.MistralConfig(num_hidden_layers=2, sliding_window=7)) == [7, 7]
    found = {}
    hf_models.stream_attention(model, tokens(samples=1), lambda i, a: found.update({i: a.double()}))
    sliding, full = found[0], found[1]
    assert (sliding[..., :WINDOW, 0] > 0).all() and (sliding[..., WINDOW:, 0] == 0).all()
    scores = sink_values(sliding, window=WINDOW)
    assert np.allclose(scores["first_token_visible"], sliding[..., :WINDOW, 0].mean(-1).numpy(), rtol=1e-12)
    assert np.allclose(scores["first_token"], sliding[..., :, 0].sum(-1).numpy() / T, rtol=1e-12)
    assert np.array_equal(*(sink_values(full, window=None)[k] for k in ("first_token", "first_token_visible")))
    assert lm_analysis.layer_kind(WINDOW) == "sliding 4" and lm_analysis.layer_kind(None) == "full"


def test_several_models_and_inputs_write_a_summary_and_the_figure(folders, run_ok, tmp_path):
    """Two models, then two inputs: summary.csv holds one row a pair, counted here from the pair's own CSVs, and the
    figure of the models; without the sink study (one of the four the figure draws) the summary but no figure."""
    models = f"{folders['gpt2']},{folders['llama']}"
    run_ok("pretrained.py", "--model", models, "--input", "random", "--quick", "--out", tmp_path / "all")
    summary = pd.read_csv(tmp_path / "all" / "summary.csv")
    assert list(zip(summary.model, summary.input)) == [("gpt2", "random"), ("llama", "random")]
    for row in summary.itertuples():
        read = lambda study: pd.read_csv(tmp_path / "all" / row.model / row.input / f"{study}.csv")
        section4, tables56, sink = read("section4"), read("tables56"), read("sink")
        decided = tables56.samples - tables56.ties
        wins = ((tables56.p_value < 0.05) & (tables56.wins > decided / 2)).sum()
        losses = ((tables56.p_value < 0.05) & (tables56.wins < decided / 2)).sum()
        assert row.first_token and row.layers == 2 and (row.wins, row.losses) == (wins, losses)
        assert row.fidelity_max == pytest.approx(section4.fidelity_mean.max(), rel=1e-12)
        assert row.sink_share == pytest.approx(sink.sink_share.mean(), abs=1e-12)
    assert all((tmp_path / "all" / f"models.{ext}").stat().st_size > 1000 for ext in ("png", "pdf"))
    run_ok("pretrained.py", "--model", folders["gpt2"], "--input", "repeat,random", "--quick", "--studies",
           "section4,tables56,synergy", "--out", tmp_path / "three")
    summary = pd.read_csv(tmp_path / "three" / "summary.csv")
    assert summary.input.tolist() == ["repeat", "random"] and not (tmp_path / "three" / "models.png").exists()


def test_outputs_are_written_atomically(folders, run_main, tmp_path, monkeypatch):
    """A write that fails half way (here samples.csv's, after some bytes) leaves neither the file nor a temporary
    one behind, and the run ends in one line."""
    to_csv = pd.DataFrame.to_csv

    def failing(frame, path, *args, **kwargs):
        if "section4.fidelity" in frame.columns:
            with open(path, "w") as f:
                f.write("sample,layer\n0,")
            raise OSError("disk full")
        return to_csv(frame, path, *args, **kwargs)
    monkeypatch.setattr(pd.DataFrame, "to_csv", failing)
    code, _, err = run_main("pretrained.py", "--model", folders["gpt2"], "--quick", "--studies", "section4",
                            "--out", tmp_path)
    assert code == 2 and "error: disk full" in err
    folder = tmp_path / "gpt2" / "repeat"
    assert (folder / "tokens.csv").is_file() and not (folder / "samples.csv").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_half_precision_is_within_its_tolerance_of_float32_and_a_device_map_changes_nothing(folders, loaded):
    """--dtype bfloat16 / float16: the forward pass in half precision, each attention row renormalised in float64
    (lm_analysis.float64_rows): the proxies within 2% (bfloat16, 8 bits of mantissa) and 0.2% (float16, 11 bits) of
    float32's on a tiny Llama. device_map="auto" (accelerate, here the CPU alone) gives the same values exactly."""
    from lm_analysis import study_values
    ids = tokens(seed=3)
    reference = study_values(loaded["llama"], ids, PAPER, ("section4",), progress=False)[True]["section4"]
    for dtype, rtol in (("bfloat16", 2e-2), ("float16", 2e-3)):
        model = hf_models.load_causal_lm(folders["llama"], dtype=dtype)
        assert model.dtype == getattr(torch, dtype)
        half = study_values(model, ids, PAPER, ("section4",), progress=False)[True]["section4"]
        for name in ("mixing_time", "mixing_time_normalized", "fidelity"):
            assert np.allclose(half[name], reference[name], rtol=rtol, atol=0), (dtype, name)
    mapped = hf_models.load_causal_lm(folders["llama"], device_map="auto")
    placed = study_values(mapped, ids, PAPER, ("section4",), progress=False)[True]["section4"]
    assert all(np.array_equal(placed[name], reference[name]) for name in reference)


def test_layers_studied_two_at_a_time_give_the_values_of_one_at_a_time(loaded, monkeypatch):
    """On a CPU study_values studies layers on LM_LAYER_WORKERS threads while the forward pass goes on, with layers
    waiting for them up to LM_WAITING_BYTES: the same values, bit for bit, as one layer at a time (a layer past
    LM_PARALLEL_BYTES in float64), every study, both DAGs, on a sliding-window Gemma 2; the workers run behind the
    forward pass (Linux: a nice value WORKER_NICENESS above the process's) and torch's threads are set back."""
    ids, model, threads = tokens(seed=4), loaded["gemma2"], torch.get_num_threads()
    assert lm_analysis.layer_workers(model, T) == (2, lm_analysis.LM_WAITING_BYTES // (4 * T * T * 4))
    two = lm_analysis.study_values(model, ids, PAPER, variants=(True, False), progress=False)
    assert torch.get_num_threads() == threads
    monkeypatch.setattr(lm_analysis, "LM_PARALLEL_BYTES", 4 * T * T * 8 - 1)
    assert lm_analysis.layer_workers(model, T) == (1, 0)  # the forward pass waits for each layer, as before
    one = lm_analysis.study_values(model, ids, PAPER, variants=(True, False), progress=False)
    flat = lm_analysis._flat  # {dotted name: array}
    for variant in (True, False):
        assert flat(one[variant]).keys() == flat(two[variant]).keys()
        assert all(np.array_equal(a, flat(two[variant])[k], equal_nan=True) for k, a in flat(one[variant]).items())
    if os.uname().sysname == "Linux":
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(1) as pool:
            nice = pool.submit(lambda: (lm_analysis.behind_the_forward(),
                                        os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))[1]).result()
        assert nice == min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + lm_analysis.WORKER_NICENESS)


def test_float64_rows_renormalises_half_precision_only():
    attn = torch.tensor([[[1.0, 0.0], [0.4, 0.6]]])
    assert lm_analysis.float64_rows(attn) is attn
    half = lm_analysis.float64_rows(torch.tensor([[[1.0, 0.0], [0.25, 0.7]]], dtype=torch.bfloat16))
    row = torch.tensor([0.25, 0.69921875], dtype=torch.float64)  # 0.7 in bfloat16
    assert half.dtype == torch.float64 and torch.equal(half[0, 1], row / 0.94921875)
    assert torch.equal(half[0, 0], row.new_tensor([1, 0]))


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "float8"], "--dtype must be one of float32, bfloat16, float16, got 'float8'"),
    (["--device-map", "balanced"], "--device-map must be auto"),
    (["--device-map", "auto"], "--device-map auto needs the accelerate package: pip install accelerate")])
def test_bad_dtype_and_device_map_are_one_line(flags, message, folders, run_main, tmp_path, monkeypatch):
    if "auto" in flags:  # accelerate is installed here: take it away
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else
                            real(name, *a))
    code, _, err = run_main("pretrained.py", "--model", folders["gpt2"], "--quick", *flags, "--out", tmp_path / "x")
    last = err.strip().splitlines()[-1]  # argparse's usage, then the one line
    assert code == 2 and last.startswith("pretrained.py: error: ") and message in last and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_summary_counts_read_the_right_columns():
    """summary_counts by hand on tables whose neighbouring columns differ: the authors' mixing time (not the
    normalised one), its capped share (not the normalised walk's), "bound holds" only where every sample holds (a
    share of 1), growth and beta once per layer (not once per prefix length)."""
    section4 = pd.DataFrame({"layer": [1, 2, 3], "fidelity_mean": [2.0, 1.0, 3.0], "mixing_time_mean": [20.0, 10, 30],
                             "mixing_time_normalized_mean": [200.0, 100, 300],
                             "mixing_time_capped_share_mean": [0.1, 0.3, 0.2],
                             "mixing_time_normalized_capped_share_mean": [0.7, 0.9, 0.8]})
    theorem29 = pd.DataFrame({"layer": [1, 2, 3], "bound_holds_share": [1.0, 0.875, 1.0],
                              "bound_over_measured": [4.0, 3.0, 5.0]})
    prefix = pd.DataFrame({"layer": [1, 1, 2, 2, 3, 3], "n": [16, 32] * 3,
                           "growth": ["log", "log", "linear", "linear", "log", "log"],
                           "beta": [0.2, 0.2, 0.9, 0.9, 0.5, 0.5], "beta_low": [-0.1, -0.1, 0.8, 0.8, 0.3, 0.3],
                           "beta_high": [0.4, 0.4, 1.2, 1.2, 0.7, 0.7]})
    counts = summary_counts({"section4": section4, "theorem29": theorem29, "prefix": prefix})
    assert counts == {"layers": 3, "fidelity_min": 1.0, "fidelity_max": 3.0, "mixing_time_min": 10.0,
                      "mixing_time_max": 30.0, "capped_share_max": 0.3, "bound_holds": 2,
                      "bound_over_measured_min": 3.0, "bound_over_measured_max": 5.0, "growth_log": 2,
                      "growth_linear": 1, "beta_median": 0.5, "beta_min": 0.2, "beta_max": 0.9, "beta_excludes_0": 2,
                      "beta_excludes_1": 2, "beta_between": 1}
