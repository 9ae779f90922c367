"""References for the adapter-file tests: ComfyUI's merge of one layer, transcribed from its source
(comfy/weight_adapter/{lora,loha,lokr,base}.py `calculate_weight` and `weight_decompose`, and the
"diff" patch of comfy/lora.py, at the commits docs/lora.md names), and random adapter tensors of
every LyCORIS kind in the shapes the LyCORIS library writes them."""

import torch

# Adapter kinds the tests build, and whether each needs a 3x3 conv (Tucker cores) or a bias (diff_b).
KINDS = ("lora", "loha", "loha_tucker", "lokr", "lokr_both", "lokr_full", "lokr_tucker", "dora_out", "dora_in",
         "dora_loha", "dora_lokr", "diff")
TUCKER = {"loha_tucker", "lokr_tucker"}


def comfy_merge(weight: torch.Tensor, t: dict[str, torch.Tensor], strength: float,
                tucker_as_lycoris: bool = True) -> torch.Tensor:
    """ComfyUI's fp32 merge of one layer's file tensors `t` (keys without the layer's name); a
    Tucker LoKr (lokr_t2), which ComfyUI cannot apply, as LyCORIS does unless tucker_as_lycoris=False."""
    w = weight.float().clone()
    if "diff" in t:
        return w + strength * t["diff"].float().reshape(w.shape)
    alpha = t["alpha"].item() if "alpha" in t else None
    if "lora_up.weight" in t:
        mat1, mat2 = t["lora_up.weight"].float(), t["lora_down.weight"].float()
        alpha = alpha / mat2.shape[0] if alpha is not None else 1.0
        diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(w.shape)
    elif "hada_w1_a" in t:
        w1a, w1b, w2a, w2b = (t[k].float() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        alpha = alpha / w1b.shape[0] if alpha is not None else 1.0
        if "hada_t1" in t:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"].float(), w1b, w1a)
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"].float(), w2b, w2a)
        else:
            m1, m2 = torch.mm(w1a, w1b), torch.mm(w2a, w2b)
        diff = (m1 * m2).reshape(w.shape)
    else:
        alpha, diff = _comfy_lokr(t, alpha, w.shape, tucker_as_lycoris)
    if "dora_scale" in t:
        return _comfy_weight_decompose(t["dora_scale"].float(), w, diff, alpha, strength)
    return w + (strength * alpha) * diff


def _comfy_lokr(t, alpha, shape, tucker_as_lycoris):
    dim = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"].float()
    else:
        dim = t["lokr_w1_b"].shape[0]
        w1 = torch.mm(t["lokr_w1_a"].float(), t["lokr_w1_b"].float())
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].float()
    else:
        dim = t["lokr_w2_b"].shape[0]
        if "lokr_t2" in t:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"].float(), t["lokr_w2_b"].float(),
                              t["lokr_w2_a"].float())
            if tucker_as_lycoris:  # ComfyUI's kron fails on this non-contiguous w2 (see the test)
                w2 = w2.contiguous()
        else:
            w2 = torch.mm(t["lokr_w2_a"].float(), t["lokr_w2_b"].float())
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    alpha = alpha / dim if alpha is not None and dim is not None else 1.0
    return alpha, torch.kron(w1, w2).reshape(shape)


def _comfy_weight_decompose(dora_scale, weight, lora_diff, alpha, strength):
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        weight_norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                       .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / weight_norm)
    if strength != 1.0:
        return weight + strength * (weight_calc - weight)
    return weight_calc


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
