"""References for the adapter-file tests: what ComfyUI computes when it merges one layer, restated
here from its source (comfy/weight_adapter/{lora,loha,lokr}.py and base.py's weight_decompose, the
"diff" patch of comfy/lora.py, at the commits docs/lora.md names) so that minidream's formulas
(minidream/models/adapters.py) are checked against an independent statement of them; and random
adapter tensors of every LyCORIS kind in the shapes the LyCORIS library writes them."""

import torch

# Adapter kinds the tests build, and whether each needs a 3x3 conv (Tucker cores) or a bias (diff_b).
KINDS = ("lora", "loha", "loha_tucker", "lokr", "lokr_both", "lokr_full", "lokr_tucker", "dora_out", "dora_in",
         "dora_loha", "dora_lokr", "diff")
TUCKER = {"loha_tucker", "lokr_tucker"}
# A Tucker core r x r x kh x kw joined with its two factors (rank x out, rank x in) into out x in x kh x kw.
TUCKER_JOIN = "abhw,bn,am->mnhw"


def comfy_merge(weight: torch.Tensor, t: dict[str, torch.Tensor], strength: float,
                tucker_as_lycoris: bool = True) -> torch.Tensor:
    """The layer's fp32 weight after ComfyUI applies the file tensors `t` (keys without the layer's
    name) at `strength`: W + strength * scale * delta, scale = alpha / (the rank ComfyUI divides by)
    or 1 without alpha or rank; DoRA rescales W + scale * delta by its magnitude, then strength
    interpolates from W. A Tucker LoKr (lokr_t2), which ComfyUI cannot apply, is joined as LyCORIS
    joins it unless tucker_as_lycoris=False (then it fails as ComfyUI does)."""
    base = weight.float().clone()
    if "diff" in t:
        return base + strength * t["diff"].float().reshape(base.shape)
    delta, rank = _delta_and_rank(t, base.shape, tucker_as_lycoris)
    scale = t["alpha"].item() / rank if "alpha" in t and rank is not None else 1.0
    if "dora_scale" in t:
        return _dora(base, scale * delta, t["dora_scale"].float(), strength)
    return base + strength * scale * delta


def _delta_and_rank(t: dict[str, torch.Tensor], shape: torch.Size, tucker_as_lycoris: bool):
    """The unscaled change of the layer's weight, and the rank ComfyUI's scale divides alpha by."""
    def get(key):
        return t[key].float()

    if "lora_up.weight" in t:  # up (out x r) times down (r x in...)
        return (get("lora_up.weight").flatten(1) @ get("lora_down.weight").flatten(1)).reshape(shape), t["lora_down.weight"].shape[0]
    if "hada_w1_a" in t:  # the Hadamard product of two low-rank products (Hyeon-Woo et al. 2022)
        halves = [torch.einsum(TUCKER_JOIN, get(f"hada_t{i}"), get(f"hada_w{i}_b"), get(f"hada_w{i}_a"))
                  if f"hada_t{i}" in t else get(f"hada_w{i}_a") @ get(f"hada_w{i}_b") for i in (1, 2)]
        return (halves[0] * halves[1]).reshape(shape), t["hada_w1_b"].shape[0]
    # LoKr: the Kronecker product of two factors, each whole or low-rank; the rank is the factored w2's, else w1's.
    ranks = {}
    factors = []
    for i in (1, 2):
        if f"lokr_w{i}" in t:
            factors.append(get(f"lokr_w{i}"))
            continue
        ranks[i] = t[f"lokr_w{i}_b"].shape[0]
        if i == 2 and "lokr_t2" in t:
            joined = torch.einsum(TUCKER_JOIN, get("lokr_t2"), get("lokr_w2_b"), get("lokr_w2_a"))
            factors.append(joined.contiguous() if tucker_as_lycoris else joined)  # ComfyUI's kron fails on it
        else:
            factors.append(get(f"lokr_w{i}_a") @ get(f"lokr_w{i}_b"))
    first, second = factors
    if second.ndim == 4:
        first = first[:, :, None, None]
    return torch.kron(first, second).reshape(shape), ranks.get(2, ranks.get(1))


def _dora(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float) -> torch.Tensor:
    """ComfyUI's weight decomposition (Liu et al. 2024): (W + delta) times magnitude / norm, the norm
    per output row of the base W when the magnitude has a row per output, else per input column of
    W + delta; strength s gives W + s * (that - W)."""
    adapted = base + delta
    ones = [1] * (base.ndim - 2)
    if magnitude.shape[0] == adapted.shape[0]:
        norm = base.flatten(1).norm(dim=1).reshape(-1, 1, *ones)
    else:
        norm = adapted.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *ones)
    decomposed = adapted * (magnitude / (norm + torch.finfo(base.dtype).eps))
    return decomposed if strength == 1.0 else base + strength * (decomposed - base)


def split(n: int) -> tuple[int, int]:
    """n = a * b with a the largest divisor <= sqrt(n) (LyCORIS's factorization, factor -1)."""
    a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return a, n // a


def adapter_tensors(kind: str, weight: torch.Tensor, rank: int, alpha: float | None,
                    gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random file tensors of `kind` for a layer whose weight is `weight` (out x in [x kh x kw])."""
    out, inp, *kernel = weight.shape
    k = 1
    for size in kernel:
        k *= size

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=gen) * std

    (a, b), (c, d) = split(out), split(inp)
    if kind in ("lora", "dora_out", "dora_in"):
        t = {"lora_down.weight": rand(rank, inp, *kernel), "lora_up.weight": rand(out, rank, *[1] * len(kernel))}
    elif kind in ("loha", "dora_loha"):
        t = {"hada_w1_a": rand(out, rank), "hada_w1_b": rand(rank, inp * k), "hada_w2_a": rand(out, rank),
             "hada_w2_b": rand(rank, inp * k)}
    elif kind == "loha_tucker":
        t = {"hada_w1_a": rand(rank, out), "hada_w1_b": rand(rank, inp), "hada_t1": rand(rank, rank, *kernel),
             "hada_w2_a": rand(rank, out), "hada_w2_b": rand(rank, inp), "hada_t2": rand(rank, rank, *kernel)}
    elif kind in ("lokr", "dora_lokr"):
        t = {"lokr_w1": rand(a, c), "lokr_w2_a": rand(b, rank), "lokr_w2_b": rand(rank, d * k)}
    elif kind == "lokr_both":
        t = {"lokr_w1_a": rand(a, rank), "lokr_w1_b": rand(rank, c), "lokr_w2_a": rand(b, rank),
             "lokr_w2_b": rand(rank, d * k)}
    elif kind == "lokr_full":
        t = {"lokr_w1": rand(a, c), "lokr_w2": rand(b, d, *kernel)}
    elif kind == "lokr_tucker":
        t = {"lokr_w1": rand(a, c), "lokr_t2": rand(rank, rank, *kernel), "lokr_w2_a": rand(rank, b),
             "lokr_w2_b": rand(rank, d)}
    else:  # diff
        return {"diff": rand(*weight.shape, std=0.01), "diff_b": rand(out, std=0.01)}
    if alpha is not None:
        t["alpha"] = torch.tensor(float(alpha))
    if kind.startswith("dora"):
        t["dora_scale"] = _magnitude(kind, weight, gen)
    return t


def _magnitude(kind: str, weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A trained-looking magnitude: the base's norms along the kind's axis, perturbed by ~10%."""
    ones = [1] * (weight.ndim - 2)
    if kind == "dora_in":  # per input column, 1 x in x 1 x 1 (OneTrainer, A1111)
        norm = weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, weight.shape[1], *ones)
    else:  # per output row, out x 1 x 1 x 1 (LyCORIS, PEFT)
        norm = weight.flatten(1).norm(dim=1).reshape(weight.shape[0], 1, *ones)
    return norm * (1 + 0.1 * torch.randn(norm.shape, generator=gen))
