"""Issue 19, multi-node: two torchrun agents — two "nodes" of one worker each, launched as the
README's two-node command launches them (c10d rendezvous) — on one machine, sharing the run
directory as nodes share a filesystem. They train what one launcher's two ranks train, bit for bit."""

import socket
import subprocess
import sys

from train_runs import (
    ENVIRONMENT,
    RUN_TIMEOUT_S,
    SETUPS,
    TRAIN,
    exported_weights,
    kill_run,
    losses,
    same_tensors,
    train_args,
)

SETUP = "fsdp-text-encoder-ema"  # 2 ranks of batch 1, the text encoder trained, EMA, sharded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(run_dir, data, restarts: int, *extra: str) -> list[subprocess.Popen]:
    """Both nodes' torchrun agents (the first one to bind the endpoint hosts the rendezvous store)."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_dir.name}", f"--max-restarts={restarts}", str(TRAIN),
        *train_args(run_dir, data, SETUPS[SETUP].overrides + extra),
    ]
    return [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENVIRONMENT)
            for _ in range(2)]


def finish(nodes: list[subprocess.Popen]) -> list[str]:
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=RUN_TIMEOUT_S)[0].replace("\r", "\n"))
    except subprocess.TimeoutExpired:
        for node in nodes:
            kill_run(node)
        raise AssertionError("the two nodes did not finish") from None
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log
    return logs


def test_two_nodes_at_a_c10d_rendezvous_train_what_one_launcher_trains(tmp_path, training_data, uninterrupted):
    run_dir = tmp_path / "two-nodes"
    finish(start_nodes(run_dir, training_data, 0))
    one_launcher = uninterrupted(SETUP)
    assert losses(run_dir) == losses(one_launcher)
    assert same_tensors(exported_weights(run_dir), exported_weights(one_launcher))
