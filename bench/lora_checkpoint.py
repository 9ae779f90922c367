"""The size of a LoRA training checkpoint against a full fine-tune's, at a config's UNet shapes.

The LoRA checkpoint is written for real, by `save_checkpoint` from a `TrainerState` with
adapters_only=True as train.py builds it, after one AdamW step on the adapters (so the optimizer
state is all there). Only the adapters need memory: the UNet is built on the meta device and only
its adapters are materialised, with seeded values and a seeded gradient (a checkpoint's size does
not depend on them). The full fine-tune's is the arithmetic: fp32 weights (4 bytes per parameter)
and AdamW's two fp32 moments (8), plus a trainer.pt like the LoRA one's.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from minidream.config import TrainSection, UNetConfig
from minidream.models.lora import adapted_layers, add_lora, train_adapters_only
from minidream.models.unet import UNet
from minidream.training.checkpoint import TrainerState, capture_rng, save_checkpoint
from minidream.training.optimizers import make_optimizer

FULL_BYTES_PER_PARAMETER = 4 + 8  # fp32 weight + AdamW's exp_avg and exp_avg_sq
LR = 1e-4  # configs/dreambooth-lora-sd15.yaml's


@dataclass(frozen=True)
class CheckpointSizes:
    folder: Path
    lora_bytes: dict[str, int]  # by file in the folder
    unet_parameters: int
    adapter_parameters: int

    @property
    def lora_total(self) -> int:
        return sum(self.lora_bytes.values())

    @property
    def full_total(self) -> int:
        """A full fine-tune's checkpoint: the UNet's weights and AdamW state, and the same trainer.pt."""
        return self.unet_parameters * FULL_BYTES_PER_PARAMETER + self.lora_bytes["trainer.pt"]

    @property
    def ratio(self) -> float:
        return self.full_total / self.lora_total


def adapted_unet_on_meta(cfg: UNetConfig, targets: str, rank: int, seed: int) -> tuple[UNet, list[torch.nn.Parameter]]:
    """The UNet on the meta device with CPU adapters (seeded), the base frozen; and the adapters."""
    with torch.device("meta"):
        unet = UNet(cfg)
    add_lora(unet, targets, rank)  # the adapters are built on the base's device: meta
    generator = torch.Generator().manual_seed(seed)
    for layer in adapted_layers(unet).values():
        for part in (layer.lora_down, layer.lora_up):
            part.to_empty(device="cpu")
            with torch.no_grad():
                part.weight.copy_(0.01 * torch.randn(part.weight.shape, generator=generator))
        layer.alpha = torch.tensor(layer.lora_alpha)  # the registered buffer, now on the CPU
    return unet, train_adapters_only(unet)


def lora_checkpoint(run_dir: Path, cfg: UNetConfig, targets: str, rank: int, seed: int = 0) -> CheckpointSizes:
    """Write the checkpoint of step 1 of a UNet LoRA run into run_dir, as train.py does; its sizes."""
    unet, adapters = adapted_unet_on_meta(cfg, targets, rank, seed)
    optimizer = make_optimizer([{"params": adapters, "lr": LR}], TrainSection())  # train.py's defaults: fused AdamW
    generator = torch.Generator().manual_seed(seed + 1)
    for param in adapters:
        param.grad = torch.randn(param.shape, generator=generator)
    optimizer.step()
    state = TrainerState(
        modules={"unet": unet}, optimizer=optimizer,
        lr_schedule=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        setup={"architecture": repr(cfg), "trained": ["unet"],
               "lora": {"rank": rank, "alpha": float(rank), "targets": targets, "text_encoder_rank": 0}},
        adapters_only=True, step=1,
    )
    folder = save_checkpoint(run_dir, state, [capture_rng()])
    return CheckpointSizes(
        folder=folder,
        lora_bytes={path.name: path.stat().st_size for path in sorted(folder.iterdir())},
        unet_parameters=sum(p.numel() for p in unet.parameters() if not p.requires_grad),
        adapter_parameters=sum(p.numel() for p in adapters),
    )


def checkpoint_rows(sizes: list[tuple[str, CheckpointSizes]]) -> list[str]:
    rows = [
        "| checkpoint | files | LoRA checkpoint bytes | full fine-tune bytes (arithmetic) | full / LoRA |",
        "|---|---|---:|---:|---:|",
    ]
    for name, size in sizes:
        files = ", ".join(f"{file} {n:,}" for file, n in size.lora_bytes.items())
        rows.append(f"| {name} ({size.adapter_parameters:,} adapter parameters) | {files} | {size.lora_total:,} "
                    f"| {size.full_total:,} ({size.unet_parameters:,} x {FULL_BYTES_PER_PARAMETER} + trainer.pt) "
                    f"| **{size.ratio:.0f}x** |")
    return rows
