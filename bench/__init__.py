"""Speed and memory of minidream against diffusers, on the same config and the same weights.

    python -m bench.unet_train_step   UNet training step (forward, MSE backward, AdamW)
    python -m bench.sampling_loop     DDIM sampling loop with classifier-free guidance
    python -m bench.vae               VAE encode and decode
    python -m bench.memory            peak memory of each, in separate processes
    python -m bench.gpu_suite         all of the GPU figures in one budgeted run (bench/GPU.md)
    python bench/load_memory.py       peak RAM while loading an SD 1.5 single file (minidream only)

Each prints markdown table rows for BENCHMARKS.md; `--help` lists the options.
bench.models builds the minidream/diffusers twins for these scripts and for the parity tests.
"""
