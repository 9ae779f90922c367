"""Issue 31: run.wandb=true in W&B's offline mode. wandb 0.31 has no reader for offline runs, so
the test reads the run's .wandb file itself: W&B's LevelDB-style log (a 7-byte header, 32 KiB
blocks of crc32 + length + kind chunks) of Record messages, parsed with wandb's own protobuf
classes (wandb.proto.wandb_internal_pb2)."""

import json
import struct
import subprocess
import sys

from train_runs import ENVIRONMENT, RUN_TIMEOUT_S, TRAIN, metrics, output, train_args
from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4  # LevelDB log record kinds


def read_records(path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    chunks, pending, position = [], b"", 7
    while position + 7 <= len(data):
        left_in_block = BLOCK - position % BLOCK
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left_in_block < 7 or (length == 0 and kind == 0):  # the block's zero padding
            position += left_in_block
            continue
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind == FULL:
            chunks.append(chunk)
        elif kind == LAST:
            chunks.append(pending + chunk)
        pending = pending + chunk if kind in (FIRST, MIDDLE) else b""
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def history_rows(records) -> dict[int, dict]:
    """step -> {key: value}, nested keys joined with "/"."""
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[row["_step"]] = row
    return rows


def run_train(run_dir, data, *overrides):
    # W&B's own settings and caches in the test's folder, not the home directory.
    environment = ENVIRONMENT | {"WANDB_MODE": "offline", "WANDB_SILENT": "true"} | {
        name: str(run_dir.parent / name.lower()) for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")}
    result = subprocess.run([sys.executable, str(TRAIN), *train_args(run_dir, data, overrides)], capture_output=True, text=True,
                            env=environment, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, output(result)


def test_an_offline_run_and_its_resumption_log_the_config_every_record_and_the_grids(tmp_path, training_data):
    run_dir = tmp_path / "run"
    options = ("run.wandb=true", "run.wandb_project=dreambooth-test", "validation.prompts=[a photo of sks toy]",
               "validation.every_n_steps=2", "validation.steps=2", "run.log_every_n_steps=3", "checkpoint.every_n_steps=4")
    run_train(run_dir, training_data, "train.max_steps=4", *options)
    run_train(run_dir, training_data, "train.max_steps=8", "run.resume=latest", *options)  # continues from step 4

    run_id = (run_dir / "wandb-run-id").read_text().strip()
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    rows = {}
    for folder in folders:
        records = read_records(folder / f"run-{run_id}.wandb")  # the same run id in both
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert run.run_id == run_id and run.project == "dreambooth-test" and run.display_name == "run"
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert config["train"]["max_steps"] in (4, 8) and config["run"]["wandb"] is True
        steps = history_rows(records)
        assert not rows.keys() & steps.keys()  # every step in one folder only
        rows |= steps
        for row in steps.values():  # the grid files are in the offline folder
            if "validation/path" in row:
                assert (folder / "files" / row["validation/path"]).is_file()

    assert sorted(rows) == list(range(1, 9))
    for record in metrics(run_dir):  # every metrics.jsonl record, as written
        assert all(rows[record["step"]][key] == value for key, value in record.items() if key != "step")
    assert [step for step, row in sorted(rows.items()) if row.get("validation/_type") == "image-file"] == [2, 4, 6, 8]


def test_without_run_wandb_nothing_imports_wandb(tmp_path, training_data):
    check = ("import sys, train; code = train.main(sys.argv[1:]); "
             "assert 'wandb' not in sys.modules, 'wandb imported'; sys.exit(code)")
    args = train_args(tmp_path / "run", training_data, ("train.max_steps=1",))
    result = subprocess.run([sys.executable, "-c", check, *args], capture_output=True, text=True, env=ENVIRONMENT,
                            cwd=TRAIN.parent, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, output(result)


def test_a_wandb_that_cannot_start_is_one_line(tmp_path, training_data):
    environment = ENVIRONMENT | {"WANDB_MODE": "online", "WANDB_API_KEY": "", "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                                 "NETRC": str(tmp_path / "netrc")}  # no key from the machine
    args = train_args(tmp_path / "run", training_data, ("train.max_steps=1", "run.wandb=true"))
    result = subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True, env=environment, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == ("error: run.wandb=true: No API key configured. Use `wandb login` to log in. "
                                              "(or set WANDB_MODE=offline)")
