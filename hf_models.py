"""Hugging Face causal language models as the paper reads them: eager attention, one layer's heads at a time, and
the learned head weights of each layer (the norm of each head's block of its output projection).

    from hf_models import load_causal_lm, stream_attention, head_weights, supported
    model = load_causal_lm("gpt2", device="cpu")           # a hub name (needs a network or its cache) or a folder in
                                                          # the save_pretrained layout; eager attention, eval mode
    w = head_weights(model)                                # (L, H) float64, each row sums to 1
    stream_attention(model, tokens, lambda layer, attn: ...)   # attn (B, H, T, T) of one layer, then let go
    study_values(model, tokens, cfg, studies, lengths)     # every study's per-layer values, layers streamed

Supported: GPT-2, GPT-NeoX/Pythia, Llama, Mistral, Qwen2, Gemma 2 and Gemma 3 (text); their output projections
differ in layout (GPT-2's c_proj is a Conv1D whose weight is (in, out): a head's block is a block of rows; the others
are nn.Linear, (out, in): a block of columns, with head_dim from the config where it has one). With grouped-query
attention, eager attention repeats the key/value heads, so there is one matrix (and one weight) per query head.
Sliding-window layers (Gemma, Qwen2/Mistral where enabled) give a banded DAG: their mask is in the weights.
"""
import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from evaluation import STUDIES, layer_study_values, without_first_token


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
HUB_OFFLINE_ADVICE = ("no network here? Download the model where there is one (e.g. huggingface-cli download NAME, "
                      "or save_pretrained) and pass --model FOLDER, or fill the Hugging Face cache ($HF_HOME)")


def supported(model_type):
    """Whether this module reads the per-head attention of a model_type."""
    return model_type in ARCHITECTURES


def _config_of(name_or_folder):
    """The model's config, checked: a folder needs config.json; a hub name is read from the hub or its cache."""
    from transformers import AutoConfig
    folder = Path(name_or_folder)
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} has no config.json: expected a model folder in the save_pretrained layout "
                             f"(config.json and the weights)")
    try:
        config = AutoConfig.from_pretrained(str(name_or_folder))
    except (OSError, ValueError) as error:
        if folder.exists():
            raise ValueError(f"{folder}/config.json could not be read: {str(error).splitlines()[0][:200]}") from error
        raise ValueError(f"could not load {name_or_folder!r} from the Hugging Face hub or its cache: "
                         f"{str(error).splitlines()[0][:160]}; {HUB_OFFLINE_ADVICE}") from error
    if not supported(config.model_type):
        raise ValueError(f"{name_or_folder}: architecture {config.model_type!r} is not supported (expected a causal "
                         f"LM with per-head softmax attention: {NAMES})")
    return config


def load_causal_lm(name_or_folder, device="cpu"):
    """The causal LM in float32, eager attention (the only one that returns attention weights), eval mode, on
    `device`; ValueError with one line on what is wrong (no config.json, an unsupported architecture, a hub name
    that cannot be fetched)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()  # one line per file loaded is noise in a script's output
    config = _config_of(name_or_folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_folder), config=config, dtype=torch.float32,
                                                     attn_implementation="eager")
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load the weights of {name_or_folder!r}: {str(error).splitlines()[0][:200]}"
                         + ("" if Path(name_or_folder).exists() else f"; {HUB_OFFLINE_ADVICE}")) from error
    return model.to(device).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def load_tokenizer(name_or_folder):
    """The model's tokenizer (for --input text); ValueError where the folder or hub name has none (transformers would
    build an empty one from a folder without tokenizer files)."""
    from transformers import AutoTokenizer
    folder = Path(name_or_folder)
    if folder.exists() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}), which --input text needs")
    try:
        return AutoTokenizer.from_pretrained(str(name_or_folder))
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{name_or_folder} has no tokenizer (tokenizer.json or its files), which --input text "
                         f"needs: {str(error).splitlines()[0][:160]}") from error


def max_positions(config):
    """The longest sequence the model's position embeddings allow (None where the config sets no limit)."""
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


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


def stream_attention(model, input_ids, on_layer):
    """One forward pass over input_ids (B, T) in which each layer, as soon as it has run, hands its attention
    (B, H, T, T), on the model's device, to on_layer(layer_index, attention); nothing keeps it afterwards, so at most
    one layer's attention is alive at a time. Returns nothing; the model's own outputs are discarded."""
    modules = attention_modules(model)

    def hook_of(index):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise ValueError(f"layer {index} returned no attention weights: load the model with eager attention "
                                 f"(load_causal_lm does)")
            on_layer(index, weights)  # under no_grad: no graph to detach from; the caller's to let go
        return hook
    handles = [module.register_forward_hook(hook_of(i)) for i, module in enumerate(modules)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def _concatenated(parts, axis):
    """Nested dicts of arrays, joined leaf by leaf along `axis`: the layers' (S, 1) into (S, L) (axis 1), the
    samples' (1, L) into (S, L) (axis 0)."""
    if isinstance(parts[0], dict):
        return {key: _concatenated([p[key] for p in parts], axis) for key in parts[0]}
    return np.concatenate([np.asarray(p) for p in parts], axis=axis)


def study_values(model, tokens, cfg, studies=STUDIES, lengths=(), first_token=True):
    """Every study's values (evaluation.layer_study_values), (S, L) arrays, from one forward pass per sample of
    tokens (S, T), the layers streamed: memory holds one layer's attention of one sample at a time. first_token=False:
    on the DAG without position 0 (evaluation.without_first_token), prefix lengths counted without it."""
    weights = head_weights(model)
    read = (lambda attn: attn) if first_token else without_first_token
    per_sample = []
    for sample in tokens:
        layers = []
        stream_attention(model, sample[None], lambda i, attn: layers.append(
            layer_study_values(read(attn), weights[i], cfg, studies, lengths)))
        per_sample.append(_concatenated(layers, axis=1))
    return _concatenated(per_sample, axis=0)


def prefix_lengths(length):
    """The prefix study's lengths: 16, 32, 64, ... below `length`, then `length` itself (from 8 for inputs of at most
    16 tokens)."""
    first = 16 if length > 16 else 8
    return sorted({n for n in (first * 2 ** k for k in range(20)) if n < length} | {length})


def model_label(name_or_folder):
    """A file-system-safe name for the model's output folder: a folder's name, or the hub name with / as __."""
    path = Path(name_or_folder)
    return path.resolve().name if path.exists() else str(name_or_folder).replace("/", "__").replace(os.sep, "__")
