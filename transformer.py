"""The paper's causal Transformer (Section 4): pre-norm RMSNorm blocks, one multi-head attention and one ReLU MLP each.

Parameter names and shapes match the authors' released checkpoints, so their state_dicts load unchanged:

    from transformer import Transformer
    model = Transformer(vocab_size=256, embed_dim=64, num_heads=4, num_layers=4, mlp_hidden_dim=128, max_seq_length=100)
    logits = model(tokens)                          # (B, T, V)
    logits, attns = model(tokens, return_attn=True)  # attns: one (B, H, T, T) tensor per layer
    model.attention(tokens)                          # eval mode, all layers: (B, L, H, T, T)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import cpu_attention


def dropout_keep_mask(shape, p, device=None):
    """Boolean mask keeping each entry with probability 1 - p (to 2^-31): one 32-bit random integer per entry.

    Dropout's semantics at a quarter of the cost of torch.bernoulli_ on the CPU, where the attention-weight masks
    of a 16-head layer dominate a training step (bench.py)."""
    return torch.empty(shape, dtype=torch.int32, device=device).random_() >= round(p * 2 ** 31)


def causal_bias(T, dtype, device):
    """(T, T) additive mask: 0 where query i may attend to key j <= i, -inf above the diagonal."""
    return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu(1)


def _attention_cpu_dropout(q, k, v, dropout_p, causal):
    """softmax(q k^T / sqrt(d) + causal mask) with dropout, @ v, in PyTorch ops: CPU training where cpu_attention's
    kernel cannot be compiled (PyTorch's fused kernel has no dropout on the CPU and falls back to slow generic code).
    One baddbmm makes the masked, scaled scores; the 1 / (1 - p) rescaling is applied to v (T x d) rather than to
    the T x T weights."""
    B, H, T, d = q.shape
    bias = causal_bias(T, q.dtype, q.device) if causal else torch.zeros(T, T, dtype=q.dtype, device=q.device)
    scores = torch.baddbmm(bias, q.reshape(B * H, T, d), k.reshape(B * H, T, d).transpose(1, 2),
                           alpha=1.0 / math.sqrt(d))
    attn = scores.softmax(dim=-1)
    attn = attn * dropout_keep_mask(attn.shape, dropout_p, q.device).to(attn.dtype)  # cheaper than where()
    return (attn @ (v.reshape(B * H, T, d) * (1.0 / (1.0 - dropout_p)))).view(B, H, T, d)


class MultiHeadAttention(nn.Module):
    """Separate Q, K, V and output projections (each E x E with bias), scaled dot product, dropout on the weights."""

    def __init__(self, embed_dim, num_heads, dropout, causal):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, "
                             f"num_heads={num_heads}")
        self.num_heads, self.head_dim, self.dropout, self.causal = num_heads, embed_dim // num_heads, dropout, causal
        self.W_q = nn.Linear(embed_dim, embed_dim)
        self.W_k = nn.Linear(embed_dim, embed_dim)
        self.W_v = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _split_heads(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)

    def forward(self, x, return_attn=False):
        B, T, E = x.shape
        q, k, v = self._split_heads(self.W_q(x)), self._split_heads(self.W_k(x)), self._split_heads(self.W_v(x))
        dropout_p = self.dropout if self.training else 0.0
        if return_attn:  # the explicit computation of the authors' code: the weights are needed by the proxies
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if self.causal:
                scores = scores + causal_bias(T, scores.dtype, x.device)
            attn = scores.softmax(dim=-1)
            out = F.dropout(attn, dropout_p, self.training) @ v
        elif self.training and cpu_attention.usable(q):  # CPU training: the fused kernel of cpu_attention.py
            attn, out = None, cpu_attention.attention(q, k, v, dropout_p, self.causal)
        elif dropout_p and not q.is_cuda:  # CPU training without a C compiler, or not in float32
            cpu_attention.warn_if_unavailable()
            attn, out = None, _attention_cpu_dropout(q, k, v, dropout_p, self.causal)
        else:  # same maths through the fused kernel
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, E)), attn


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + dropout(mlp(norm(x)))."""

    def __init__(self, embed_dim, num_heads, mlp_hidden_dim, dropout, causal):
        super().__init__()
        self.ln1 = nn.RMSNorm(embed_dim)
        self.attn = MultiHeadAttention(embed_dim, num_heads, dropout, causal)
        self.ln2 = nn.RMSNorm(embed_dim)
        # Index 0 and 2 carry the weights, as in the released checkpoints (mlp.0, mlp.2); 3 is the MLP's dropout.
        self.mlp = nn.Sequential(nn.Linear(embed_dim, mlp_hidden_dim), nn.ReLU(), nn.Linear(mlp_hidden_dim, embed_dim),
                                 nn.Dropout(dropout))

    def forward(self, x, return_attn=False):
        a, attn = self.attn(self.ln1(x), return_attn)
        x = x + a
        return x + self.mlp(self.ln2(x)), attn


class Transformer(nn.Module):
    def __init__(self, vocab_size, embed_dim, num_heads, num_layers, mlp_hidden_dim, max_seq_length,
                 dropout=0.1, causal=True):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, embed_dim=embed_dim, num_heads=num_heads, num_layers=num_layers,
                           mlp_hidden_dim=mlp_hidden_dim, max_seq_length=max_seq_length, dropout=dropout, causal=causal)
        self.token_emb = nn.Embedding(vocab_size, embed_dim)
        self.pos_emb = nn.Embedding(max_seq_length, embed_dim)
        self.layers = nn.ModuleList(Block(embed_dim, num_heads, mlp_hidden_dim, dropout, causal)
                                    for _ in range(num_layers))
        self.out_proj = nn.Linear(embed_dim, vocab_size)  # no final norm, as in the paper

    def forward(self, tokens, return_attn=False):
        T = tokens.shape[1]
        if T > self.pos_emb.num_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_seq_length={self.pos_emb.num_embeddings}")
        x = self.token_emb(tokens) + self.pos_emb(torch.arange(T, device=tokens.device))
        attns = []
        for layer in self.layers:
            x, attn = layer(x, return_attn)
            attns.append(attn)
        logits = self.out_proj(x)
        return (logits, attns) if return_attn else logits

    @torch.no_grad()
    def attention(self, tokens):
        """Post-softmax attention of every layer in eval mode, on the model's device: (B, L, H, T, T)."""
        was_training = self.training
        self.eval()
        _, attns = self(tokens.to(self.pos_emb.weight.device), return_attn=True)
        self.train(was_training)
        return torch.stack(attns, dim=1)
