"""What autograd keeps for backward in one UNet training forward, minidream against diffusers,
split into the weights themselves, autocast's half-precision copies of them, and activations.

Unlike a peak-memory reading this is exact and noise-free, and it runs on any device: it is
the activation memory a training step adds on top of the weights, gradients and AdamW state
(4 + 4 + 8 bytes per trained parameter, the same for every implementation). Each storage is
counted once, however many ops save it.
"""

import sys

import torch
from torch.autograd.graph import saved_tensors_hooks

from bench.common import command, machine, parser, settings_from, versions
from bench.models import IMPLEMENTATIONS, unet_forward
from bench.unet_train_step import training_inputs, training_models

VIEWS = ("TBackward0", "ViewBackward0", "TransposeBackward0", "PermuteBackward0", "ExpandBackward0", "UnsafeViewBackward0")
KINDS = ("weights", "weight copies", "activations")


def is_weight_copy(grad_fn) -> bool:
    """Autocast's cast of a parameter (seen through views): ToCopyBackward of a leaf."""
    while grad_fn is not None and type(grad_fn).__name__ in VIEWS:
        grad_fn = grad_fn.next_functions[0][0]
    return (
        grad_fn is not None
        and type(grad_fn).__name__.startswith("ToCopyBackward")
        and type(grad_fn.next_functions[0][0]).__name__ == "AccumulateGrad"
    )


def saved_bytes(forward, inputs, params: list[torch.nn.Parameter], settings) -> dict[str, int]:
    """Bytes of each kind saved for backward during one forward under autocast in --dtype."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, tuple[str, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in param_storages:
            kind = "weights"
        elif is_weight_copy(tensor.grad_fn):
            kind = "weight copies"
        else:
            kind = "activations"
        storages[storage.data_ptr()] = (kind, storage.nbytes())
        return tensor

    x, t, context, _ = inputs
    with saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast(settings.device.type, dtype=settings.dtype, enabled=settings.dtype != torch.float32):
            forward(x, t, context)
    return {kind: sum(n for k, n in storages.values() if k == kind) for kind in KINDS}


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    argv = sys.argv[1:] if argv is None else argv
    options = parser(__doc__.splitlines()[0])
    options.add_argument("--batch", type=int, default=1)
    options.add_argument("--latent", type=int, default=64, help="latent height and width (64: 512px images)")
    args = options.parse_args(argv)
    settings = settings_from(args)

    unet, twin = training_models(settings, gradient_checkpointing=False)
    params = list(unet.parameters())
    inputs = training_inputs(settings, args.batch, args.latent)
    results = {impl: saved_bytes(unet_forward(impl, unet, twin), inputs, params, settings) for impl in IMPLEMENTATIONS}

    print(f"\nMachine: {machine(settings.device)}; {versions()}")
    print(f"Command: `{command(__spec__.name, argv)}` (batch {args.batch}, latent {args.latent}x{args.latent}, "
          f"{settings.describe()})\n")
    print("| saved for backward | minidream MiB | diffusers MiB | minidream/diffusers |\n|---|---:|---:|---:|")
    for kind in KINDS:
        ours, theirs = results["minidream"][kind], results["diffusers"][kind]
        ratio = f"**{ours / theirs:.3f}**" if theirs else "-"
        print(f"| {kind} | {ours / 2**20:.1f} | {theirs / 2**20:.1f} | {ratio} |")
    return results


if __name__ == "__main__":
    main()
