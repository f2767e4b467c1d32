"""The one configuration: every hyperparameter, the experiment grid and the repo's fixed names and places.

    from config import PAPER, QUICK, HEADS, TASKS, SEED, CKPT_DIR

Everything else imports from here; this module imports nothing of the repo's.
"""
import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Training:
    """What trains a model, and so a checkpoint's and a resume state's identity; the defaults are the paper's (its
    Section 4). Changing any of these makes another run."""
    vocab_size: int = 256
    embed_dim: int = 64
    num_layers: int = 4
    mlp_hidden_dim: int = 128
    seq_length: int = 100
    dropout: float = 0.1
    num_sequences: int = 5000
    batch_size: int = 50
    epochs: int = 200
    lr: float = 1e-3


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """How a trained model is evaluated; changing these never touches a checkpoint or a resume state."""
    eval_sequences: int = 50  # sequences per layer for the proxies' mean +- std
    horizon: int = 100  # fidelity: diffusion steps
    max_steps: int = 100  # mixing time: cap on a walk's steps
    num_simulations: int = 500  # mixing time: Monte Carlo walks per start (--estimator mc)
    prefix_lengths: tuple = (8, 16, 32, 64, 100)  # theory.py: the trained layers on their first n tokens
    # theory.py --amplification: random head sets of these sizes and head counts, this many draws each (a Wilson 95%
    # interval within +-3 points at any share: the widest, at 1/2, needs 1068)
    amplification_sizes: tuple = (16, 32, 100)
    amplification_heads: tuple = (2, 4, 8)
    amplification_draws: int = 1068


@dataclasses.dataclass(frozen=True)
class Config(Evaluation, Training):
    """Every setting of the experiments: the training settings, then the evaluation settings (cfg.epochs,
    cfg.horizon, ...). training_settings(cfg) is the part that identifies a run."""


def training_settings(cfg):
    """{name: value} of cfg's training settings: what a checkpoint and a resume state record as their run's."""
    return {field.name: getattr(cfg, field.name) for field in dataclasses.fields(Training)}


PAPER = Config()
QUICK = Config(vocab_size=16, embed_dim=16, num_layers=2, mlp_hidden_dim=32, seq_length=12, num_sequences=120,
               batch_size=20, epochs=3, eval_sequences=6, num_simulations=50, prefix_lengths=(4, 8, 12),
               amplification_sizes=(8, 12), amplification_heads=(2, 4), amplification_draws=48)
HEADS = (1, 4, 8, 16)
AMPLIFICATION_HEADS = (4, 8, 16)  # Tables 5-6 and the synergy study: the multi-head models
TASKS = ("copy", "cycle")
SEED = 42  # the paper's
SEEDS = (0, 1, 2, 3, 4)  # the seed study's training runs, beside seed 42
AUTHORS = "authors"  # the run name of the authors' released models: shown beside ours, never pooled with them
CKPT_DIR = Path("checkpoints")
# theory.py --graphs: Vitvitskyi et al.'s graph families and sizes (their Figure 1); --quick stops at QUICK_GRAPH_SIZE
GRAPH_SIZES = {"line": (16, 32, 64), "fully_connected": tuple(2 ** k for k in range(4, 13)),
               "poisson": tuple(2 ** k for k in range(4, 11))}
POISSON_P = 0.2
POISSON_DRAWS = 10  # seeded draws per size, averaged
QUICK_GRAPH_SIZE = 64
# theory.py --amplification: how much the heads of a draw share (1 = identical heads, 0 = independent) and how peaked
# the dense family's attention is (softmax of standard normal scores over this temperature)
SHARE_LEVELS = (1.0, 0.9, 0.75, 0.5, 0.0)
DENSE_TEMPERATURE = 0.5
FORMAT = "beyondparallelism-checkpoint-v1"


def cache_dir():
    """This repo's folder in the user's cache: $XDG_CACHE_HOME (else ~/.cache)/beyondparallelism."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "beyondparallelism"


@dataclasses.dataclass(frozen=True)
class LMRuns:
    """pretrained.py's runs: these models on these inputs, samples of `length` tokens, the studies (None: every one),
    written under `out`, also without position 0 where asked, or compared with the weights re-rounded by each of
    `quantisers`."""
    models: tuple
    inputs: tuple
    length: int
    samples: int
    studies: tuple = None
    out: Path = Path("results") / "pretrained"
    without_first_token: bool = False
    quantisers: tuple = ()  # lm_quantisation: the studies again after each of these re-roundings of the weights


# pretrained.py on a CPU: the layers' studies run on this many worker threads, one torch thread each (their
# matrix-vector steps run as fast on one thread as on two), beside the forward pass, where a layer's attention in
# float64 is at most LM_PARALLEL_BYTES (each worker holds one), with up to LM_WAITING_BYTES of attention handed
# over and waiting for them; above it, one layer at a time on every thread
LM_LAYER_WORKERS = 2
LM_PARALLEL_BYTES = 2 ** 28
LM_WAITING_BYTES = 2 ** 28
# pretrained.py's prefix study: resamples of the samples behind each layer's 95% interval of its exponent beta
BETA_BOOTSTRAP_DRAWS = 2000
# pretrained.py --reproduce: the committed real-model results, then Gu et al.'s sink protocol (ICLR 2025: 100
# natural-text sequences of 64 tokens; random and repeated-token inputs beside them)
REAL_MODELS = ("smollm2", "gemma3-270m")
REAL_RESULTS = LMRuns(REAL_MODELS, ("repeat", "prose", "code"), length=1024, samples=16, without_first_token=True)
SINK_PROTOCOL = LMRuns(REAL_MODELS, ("prose", "random", "one-token"), length=64, samples=100, studies=("sink",),
                       out=Path("results") / "pretrained" / "sink_protocol")
# pretrained.py --studies gradient: random unit directions u per sample (d(u . h_{T-1}) / d e_j, a backward pass each);
# --reproduce runs it on prose and code at GRADIENT_RUNS.length (the longest that keeps --reproduce near an hour)
GRADIENT_DIRECTIONS = 8
GRADIENT_RUNS = LMRuns(REAL_MODELS, ("prose", "code"), length=256, samples=16, studies=("gradient",),
                       out=Path("results") / "pretrained" / "gradient")
# pretrained.py --quantisation: the gguf package's quantisers that round the dequantised weights once more (a small
# perturbation, a medium one, a second 4-bit rounding); --reproduce compares them with the file's own weights on
# the same 4 prose samples
QUANTISERS = ("Q8_0", "Q5_0", "Q4_0")
QUANTISATION_RUNS = LMRuns(REAL_MODELS, ("prose",), length=1024, samples=4, quantisers=QUANTISERS,
                           out=Path("results") / "pretrained" / "quantisation")
