"""The graph families of Vitvitskyi et al. (line, fully connected, Poisson) with their epsilon-mixing time and
converged fidelity, Section 3's worked example, and the two random head-set families of the amplification map.

    from graphs import line_graph, fully_connected_graph, poisson_graph, graph_rows, sparse_heads, dense_heads
    line_graph(16)                        # adjacency a[i, j] = 1 iff (j, i) is an edge (j <= i), self-loops included
    graph_rows(max_size=64, seed=42)      # theory.py --graphs: one row per family and size
    sparse_heads(draws, heads, n, share, generator)   # (draws, heads, n, n) row-stochastic, heads sharing `share`
"""
import math

import pandas as pd
import torch

import proxies
import walks
from config import DENSE_TEMPERATURE, GRAPH_SIZES, POISSON_DRAWS, POISSON_P


def line_graph(n):
    """Edges (b - 1, b) and self-loops."""
    return torch.eye(n, dtype=torch.float64) + torch.diag(torch.ones(n - 1, dtype=torch.float64), -1)


def fully_connected_graph(n):
    """Every edge (a, b) with a <= b."""
    return torch.ones(n, n, dtype=torch.float64).tril()


def poisson_graph(n, p, generator):
    """Our reading of their Poisson(p) construction (their text gives no in-degree budget): the line graph, and for
    each node b a further K_b ~ Poisson(p (b - 1)) in-edges from distinct nodes among 0..b-2 drawn uniformly, K_b
    capped at the b - 1 nodes there are: in expectation each earlier, non-adjacent node is joined with probability
    about p. The line edges keep every node on a path to the sink."""
    b = torch.arange(n, dtype=torch.float64)
    budget = torch.poisson(p * (b - 1).clamp(min=0), generator=generator)
    scores = torch.rand(n, n, generator=generator, dtype=torch.float64)
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-2)  # a <= b - 2
    rank = scores.masked_fill(~earlier, 2.0).argsort(-1).argsort(-1)  # each node's earlier nodes in a random order
    # the first budget of them: at most the b - 1 there are, so the cap needs no code
    return line_graph(n) + ((rank < budget[:, None]) & earlier).double()


def graph_values(adjacency):
    """Averaged and worst-start epsilon-mixing time, normalised fidelity n min_i phi_i (phi converged: see
    proxies.converged_minimax_fidelity) and the step at which its value became certain."""
    times = walks.epsilon_mixing_times(walks.graph_walk(adjacency))
    fidelity, horizon = proxies.converged_minimax_fidelity(walks.graph_diffusion(adjacency))
    return {"mixing_time": times["average"], "mixing_time_worst": times["worst"],
            "normalised_fidelity": len(adjacency) * fidelity, "fidelity_horizon": horizon}


def graph_rows(max_size, seed):
    """One row per family and size: the line and fully connected graphs, and the mean (and std) over POISSON_DRAWS
    seeded Poisson draws."""
    rows = []
    for family, sizes in GRAPH_SIZES.items():
        for n in (n for n in sizes if n <= max_size):
            if family == "poisson":
                generator = torch.Generator().manual_seed(seed * 100_003 + n)
                draws = pd.DataFrame([graph_values(poisson_graph(n, POISSON_P, generator))
                                      for _ in range(POISSON_DRAWS)])
                rows.append({"graph": f"poisson({POISSON_P})", "n": n, "draws": POISSON_DRAWS, **draws.mean(),
                             "mixing_time_std": draws.mixing_time.std(),
                             "normalised_fidelity_std": draws.normalised_fidelity.std()})
            else:
                adjacency = line_graph(n) if family == "line" else fully_connected_graph(n)
                rows.append({"graph": family, "n": n, "draws": 1, **graph_values(adjacency)})
    return pd.DataFrame(rows)


def reference_graphs(lengths):
    """Averaged epsilon-mixing time of the line and fully connected graphs at the prefix lengths, for the figure."""
    return {name: [walks.epsilon_mixing_time(walks.graph_walk(make(n))) for n in lengths]
            for name, make in (("line graph", line_graph), ("fully connected", fully_connected_graph))}


# Section 3's worked argument, and the random head sets of the amplification map
def three_node_heads():
    """Section 3's worked argument on nodes u, v, tau: head 1 has the edge u -> v, head 2 the edge v -> tau; self-loops
    and in-degree normalisation (walks.graph_diffusion). (2, 3, 3)."""
    adjacency = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    adjacency[0, 1, 0] = 1  # head 1: u -> v (a[i, j] = 1 iff (j, i) is an edge)
    adjacency[1, 2, 1] = 1  # head 2: v -> tau
    return walks.graph_diffusion(adjacency)


def sparse_heads(draws, heads, n, share, generator):
    """Sparse random causal DAGs: the line graph with self-loops, and each further edge (a, b), a <= b - 2, with
    probability POISSON_P (the Bernoulli form of poisson_graph's in-edges); each edge slot is common to all heads
    of a draw with probability `share`, else drawn for each head. In-degree normalised: (draws, heads, n, n)."""
    common = torch.rand(draws, 1, n, n, generator=generator)  # float32 coins: cheaper to draw, exact enough
    own_edges = torch.rand(draws, heads, n, n, generator=generator) < POISSON_P
    # a common slot (common < share) holds an edge when common / share < POISSON_P: one uniform decides both
    further = torch.where(common < share, common < share * POISSON_P, own_edges)
    return walks.graph_diffusion(line_graph(n) + (further & torch.ones(n, n, dtype=torch.bool).tril(-2)).double())


def dense_heads(draws, heads, n, share, generator):
    """Dense random causal attention: softmax over the causal mask of scores (sqrt(share) z + sqrt(1 - share) z_h)
    / DENSE_TEMPERATURE, z common to the heads of a draw and z_h each head's own, all standard normal (so each head's
    scores have the same law at every share). (draws, heads, n, n), float64."""
    common = torch.randn(draws, 1, n, n, generator=generator)  # float32 normals: cheaper to draw
    own = torch.randn(draws, heads, n, n, generator=generator)
    scores = (math.sqrt(share) * common + math.sqrt(1 - share) * own).double() / DENSE_TEMPERATURE
    return scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf).softmax(-1)


FAMILIES = {"sparse": sparse_heads, "dense": dense_heads}
