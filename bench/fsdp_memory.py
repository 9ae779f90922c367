"""Training state per rank under train.sharding=fsdp: the bytes of the local weight, gradient and
AdamW-moment shards one rank holds, and that process's resident memory, at SD 1.5 shapes.

One process plays rank 0 of N: it joins a "fake" process group of N ranks (torch's testing
backend, whose collectives return without exchanging anything), so it shards, allocates and
steps exactly what rank 0 of a real N-rank job holds — real tensors, measured by their bytes
and by the process's RSS — without the other N - 1 processes' memory (a real 4-rank SD 1.5 job
needs 16 GB in all, more than the machine these figures were measured on can spare). The
numbers the collectives carry are garbage; their sizes are not, and only sizes are measured.

    python -m bench.fsdp_memory --ranks 4 [--config sd15] [--frozen-dtype bf16] [--unet-only]

--unet-only trains the UNet alone on cached text states (random ones of the UNet's context width,
and SDXL's pooled vector y): SDXL's full fine-tune, its two text encoders frozen.

Checked against the arithmetic: 4 (fp32 weight) + 4 (gradient) + 8 (two moments) = 16 bytes per
trained parameter, / N, plus the replicated frozen VAE in the AMP dtype.
"""

import argparse
import resource
import sys

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from bench.common import command, machine, versions
from minidream.config import ARCHITECTURES, ModelConfig
from minidream.models.pipeline import text_encoder_class
from minidream.models.precision import DTYPES
from minidream.models.unet import UNet
from minidream.models.vae import AutoencoderKL
from minidream.training.sharding import shard, units

GB = 1e9


def local_bytes(tensors) -> int:
    return sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local") else t.numel() * t.element_size()
               for t in tensors)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def text_states(trained: dict[str, torch.nn.Module], cfg: ModelConfig, generator: torch.Generator):
    """The UNet's context and y for one sample: the trained text encoder's output, else cached
    states (random, of the UNet's widths); y only for models with the vector conditioning."""
    tokens = cfg.text_encoder.context_length
    if "text_encoder" in trained:
        context = trained["text_encoder"](torch.zeros(1, tokens, dtype=torch.long))
    else:
        context = torch.randn(1, tokens, cfg.unet.context_dim, generator=generator)
    y = None if cfg.unet.adm_in_channels is None else torch.randn(1, cfg.unet.adm_in_channels, generator=generator)
    return context, y


def sharded_after_one_step(ranks: int, config_name: str, latent: int, unet_only: bool = False):
    """Rank 0 of `ranks` on the fake process group: the config's UNet (and, unless `unet_only`,
    its text encoder) sharded (allocated as shards only) and stepped once at a small latent, so
    FSDP itself has made the gradient shards and AdamW its moments. Returns (trained modules,
    sharded weights, optimizer)."""
    dist.init_process_group("fake", rank=0, world_size=ranks, store=FakeStore())
    cfg = ARCHITECTURES[config_name]
    with torch.device("meta"):  # nothing is allocated whole: each rank allocates its shards only
        trained = {"unet": UNet(cfg.unet)}
        if not unet_only:
            trained["text_encoder"] = text_encoder_class(cfg.text_encoder)(cfg.text_encoder)
    groups = shard(trained, [{"params": [p for m in trained.values() for p in m.parameters()]}], torch.float32,
                   torch.device("cpu"), ranks)
    generator = torch.Generator().manual_seed(0)
    for module in trained.values():
        module.to_empty(device="cpu")
        for p in module.parameters():
            p.detach().to_local().normal_(0, 0.02, generator=generator)
    optimizer = torch.optim.AdamW(groups, lr=1e-6, fused=True)
    context, y = text_states(trained, cfg, generator)
    latents = torch.randn(1, cfg.unet.in_channels, latent, latent, generator=generator)
    trained["unet"](latents, torch.tensor([500]), context, y).float().pow(2).mean().backward()
    optimizer.step()
    return trained, [p for g in groups for p in g["params"]], optimizer


def measure(ranks: int, config_name: str, frozen_dtype: torch.dtype, latent: int, unet_only: bool) -> dict:
    before = rss_bytes()
    vae = AutoencoderKL(ARCHITECTURES[config_name].vae).to(frozen_dtype).requires_grad_(False)  # replicated, as train.py keeps it
    trained, weights, optimizer = sharded_after_one_step(ranks, config_name, latent, unet_only)
    params = sum(p.numel() for m in trained.values() for p in m.parameters())
    measured = {
        "weights": local_bytes(weights),
        "gradients": local_bytes(p.grad for p in weights),
        "moments": local_bytes(t for state in optimizer.state.values() for k, t in state.items() if k != "step"),
        "frozen": sum(t.numel() * t.element_size() for t in vae.state_dict().values()),
    }
    measured["training_state"] = measured["weights"] + measured["gradients"] + measured["moments"]
    measured |= {
        "params": params, "units": sum(len(units(m)) + 1 for m in trained.values()),
        "expected": 16 * params / ranks, "rss": rss_bytes() - before,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    dist.destroy_process_group()
    return measured


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4, help="N: the world size rank 0 plays in (default %(default)s)")
    parser.add_argument("--config", choices=ARCHITECTURES, default="sd15")
    parser.add_argument("--frozen-dtype", choices=DTYPES, default="bf16", help="the frozen VAE's (AMP) dtype")
    parser.add_argument("--latent", type=int, default=8, help="latent side of the one measured step (small: activations are not measured)")
    parser.add_argument("--unet-only", action="store_true",
                        help="train the UNet alone on cached text states (SDXL's full fine-tune: both text encoders frozen)")
    args = parser.parse_args(argv)
    if ARCHITECTURES[args.config].is_sdxl and not args.unet_only:
        parser.error(f"--config {args.config} trains the UNet alone here (its two text encoders frozen): add --unet-only")
    m = measure(args.ranks, args.config, DTYPES[args.frozen_dtype], args.latent, args.unet_only)
    print(f"Command: `{command('bench.fsdp_memory', argv if argv is not None else sys.argv[1:])}`  \nMachine: {machine(torch.device('cpu'))}  \n{versions()}\n")
    print(f"{args.config}: {'UNet' if args.unet_only else 'UNet + text encoder'} trained, {m['params'] / 1e6:.0f}M parameters in {m['units']} FSDP units; "
          f"rank 0 of {args.ranks}\n")
    print("| per rank | measured GB | arithmetic GB |")
    print("|---|---|---|")
    print(f"| fp32 weight shards | {m['weights'] / GB:.3f} | {4 * m['params'] / args.ranks / GB:.3f} |")
    print(f"| gradient shards | {m['gradients'] / GB:.3f} | {4 * m['params'] / args.ranks / GB:.3f} |")
    print(f"| AdamW moments | {m['moments'] / GB:.3f} | {8 * m['params'] / args.ranks / GB:.3f} |")
    print(f"| **training state** | **{m['training_state'] / GB:.3f}** | **{m['expected'] / GB:.3f}** (16 B x params / N) |")
    print(f"| frozen VAE ({args.frozen_dtype}, replicated) | {m['frozen'] / GB:.3f} | |")
    print(f"| process RSS after the step (growth) / peak RSS | {m['rss'] / GB:.3f} / {m['peak_rss'] / GB:.3f} | |")
    return m


if __name__ == "__main__":
    main()
