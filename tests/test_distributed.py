"""Distributed training on CPU with Gloo: N processes under torchrun train what one process trains
on the same global batch, equal up to float32 rounding (each step's bits/dim over 2 steps, and the
parameters after 2 and 4 steps, within TOLERANCE; not bit for bit: the all-reduce sums the
gradients in another order, a difference that compounds over a long run), only rank 0 writes, a
run resumes under another world size, and a stopped rank ends the run after the process group's
timeout, named.

The 2-process runs go through the real entry point (``python -m torch.distributed.run -m glowflow
train``) on a tiny Fashion-MNIST-shaped IDX set written here; the 1-process reference is the
:class:`Trainer` in this process. Every run uses ``memory="invertible"``, so DDP is also checked with
the invertible-recomputation backward (a custom autograd Function that returns parameter gradients).
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from glowflow import checkpoint as ckpt
from glowflow.config import build_train_config
from glowflow.data import get_dataset
from glowflow.distributed import DistInfo
from glowflow.rundir import RAW_WEIGHTS
from glowflow.train import Trainer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with Gloo is not available"),
]

STEPS = 4  # the full run; the interrupted runs stop at STEPS // 2
HALF = STEPS // 2
TOLERANCE = 1e-5  # float32 rounding of a few steps, far below what one step changes (checked)
RUN_TIMEOUT_S = 120  # one torchrun launch; it is killed (with its workers) after this

PRESET = {
    "dataset": "fashion-mnist",
    "model": {"image_shape": [1, 28, 28], "levels": 2, "steps": 2, "hidden_channels": 8,
              "permutation": "invconv_lu"},
    "memory": "invertible",
    "batch_size": 8, "init_batch_size": 16, "lr": 1e-3, "warmup_steps": 2, "max_steps": STEPS,
    "log_every": 1, "eval_every": 1000, "sample_every": 1000, "checkpoint_every": 1000,
    "test_limit": 4, "ema_decay": 0.9, "progress": False, "device": "cpu",
}


# ------------------------------------------------------------------------------------ helpers
def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.tobytes()))


def _fake_fashion_mnist(root: Path, n_train: int = 64, n_test: int = 8) -> Path:
    """Random uint8 images in the Fashion-MNIST IDX layout (28x28, labels 0..9)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return root


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # every rank is on this machine
    return env


def _torchrun(nproc: int, preset: Path, data: Path, out: Path, *extra: str) -> str:
    """``torchrun --nproc_per_node=nproc -m glowflow train ...``; its stdout, or a failure with its log."""
    return _launch(nproc, ["-m", "glowflow", "train", "--preset", str(preset), "--data", str(data),
                           "--out", str(out), *extra])


def _launch(nproc: int, program: list[str], check: bool = True) -> str:
    """``torchrun`` on this machine; its output. ``check``: fail unless every worker exited with 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", *program]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every worker it started
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {RUN_TIMEOUT_S} s:\n{output[-4000:]}")
    if check:
        assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{output[-4000:]}"
    return output


def _preset_file(directory: Path) -> str:
    path = directory / "tiny.json"
    path.write_text(json.dumps(PRESET))
    return str(path)


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def _raw(out: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_tensors(out / ckpt.CHECKPOINT_DIR / RAW_WEIGHTS)


def _ema(out: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_tensors(out / ckpt.CHECKPOINT_DIR / ckpt.WEIGHTS_NAME)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "bits_per_dim" in r and "event" not in r]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data, preset, the uninterrupted 1-process reference, and a 2-process run from scratch to HALF."""
    root = tmp_path_factory.mktemp("dist")
    data = _fake_fashion_mnist(root / "data")
    preset = _preset_file(root)
    cfg = build_train_config(preset, [f"data={data}"])
    train_data = get_dataset("fashion-mnist", data, "train")
    test_data = get_dataset("fashion-mnist", data, "test", limit=PRESET["test_limit"])

    reference = Trainer(cfg, root / "one_process", train_data, test_data, log=lambda *a: None)
    rows = []
    while reference.step < HALF:
        rows.append(reference.train_step())
    half = {"raw": _snapshot(reference.model), "ema": _snapshot(reference.ema.model)}
    reference.save_checkpoint()  # a 1-process checkpoint at HALF, for the 1 -> 2 resume
    one_process_half = root / "one_process_half"
    shutil.copytree(root / "one_process", one_process_half)
    while reference.step < STEPS:  # the same Trainer goes on: uninterrupted
        reference.train_step()
    full = {"raw": _snapshot(reference.model)}

    two_process = root / "two_process"
    log = _torchrun(2, preset, data, two_process, "--max-steps", str(HALF))
    return dict(root=root, data=data, preset=preset, cfg=cfg, train_data=train_data, test_data=test_data,
                half=half, full=full, one_process_half=one_process_half, two_process=two_process, log=log,
                rows=rows)


# ------------------------------------------------------------------------------------ tests
def test_two_processes_train_what_one_process_trains_up_to_rounding(setup):
    """Equal at each step up to float32 rounding, not bit for bit (DDP averages two half-batch
    gradients, one process sums the whole batch in another order)."""
    out = setup["two_process"]
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [r["step"] for r in setup["rows"]] == list(range(1, HALF + 1))
    for two, one in zip(rows, setup["rows"]):  # each step's loss, on the same batch
        assert abs(two["bits_per_dim"] - one["bits_per_dim"]) <= TOLERANCE, (two, one)
    # data-dependent init on the global batch, DDP's averaged gradients, the same EMA
    assert _max_abs_diff(_raw(out), setup["half"]["raw"]) <= TOLERANCE
    assert _max_abs_diff(_ema(out), setup["half"]["ema"]) <= TOLERANCE
    # and the run really moved the weights (the comparison is not of two initial states)
    init = Trainer(setup["cfg"], setup["root"] / "init_only", setup["train_data"], log=lambda *a: None)
    assert _max_abs_diff(_raw(out), _snapshot(init.model)) > 100 * TOLERANCE


def test_only_rank_zero_logs_and_writes(setup):
    out = setup["two_process"]
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, HALF + 1))  # one row per step, not one per rank
    assert setup["log"].count("test bits/dim") == 1
    assert (out / "samples.png").is_file()


def test_a_rank_other_than_zero_writes_nothing(tmp_path):
    """Rank 1's view of a 2-process run, in a 1-member Gloo group: it trains, and leaves no file."""
    data = _fake_fashion_mnist(tmp_path / "data")
    cfg = build_train_config(_preset_file(tmp_path), [f"data={data}", "max_steps=2", "checkpoint_every=1"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        trainer = Trainer(cfg, tmp_path / "out", get_dataset("fashion-mnist", data, "train"),
                          get_dataset("fashion-mnist", data, "test", limit=4),
                          dist=DistInfo(rank=1, world_size=2), log=lambda *a: pytest.fail(f"rank 1 logged {a}"))
        summary = trainer.run()
    finally:
        dist.destroy_process_group()
    assert summary["steps"] == 2
    assert not (tmp_path / "out").exists()


def test_a_two_process_run_resumes_in_one_process(setup, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(setup["two_process"], out)
    trainer = Trainer(setup["cfg"], out, setup["train_data"], setup["test_data"], resume=True, log=lambda *a: None)
    assert trainer.step == HALF
    trainer.run()
    assert _max_abs_diff(_raw(out), setup["full"]["raw"]) <= TOLERANCE
    assert [r["step"] for r in _train_rows(out)] == list(range(1, STEPS + 1))


def test_a_one_process_run_resumes_in_two_processes(setup, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(setup["one_process_half"], out)
    log = _torchrun(2, setup["preset"], setup["data"], out, "--resume")
    assert f"at step {HALF}" in log
    assert _max_abs_diff(_raw(out), setup["full"]["raw"]) <= TOLERANCE


NAN_ON_ONE_RANK = """
import json, sys
import torch
from glowflow import distributed as dist_utils
from glowflow.config import build_train_config
from glowflow.data import get_dataset
from glowflow.train import Trainer

preset, data, out = sys.argv[1:4]
info = dist_utils.setup("cpu")
cfg = build_train_config(preset, [f"data={data}"])
trainer = Trainer(cfg, out, get_dataset("fashion-mnist", data, "train"), dist=info, log=lambda *a: None)
ddp_forward, calls = trainer.train_model, []

def flaky(x, y=None, noise=None):  # rank 1's second loss is NaN; rank 0 sees nothing wrong
    result = ddp_forward(x, y, noise=noise)
    calls.append(1)
    if info.rank == 1 and len(calls) == 2:
        return result._replace(bits_per_dim=result.bits_per_dim * float("nan"))
    return result

trainer.train_model = flaky
rows = [trainer.train_step() for _ in range(3)]
weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()]).double()
with open(f"{out}.rank{info.rank}.json", "w") as f:  # not stdout: the ranks' lines could interleave
    json.dump({"rank": info.rank, "skipped": [r["skipped"] for r in rows],
               "sum": float(weights.sum()), "norm": float(weights.norm())}, f)
dist_utils.teardown()
"""


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(setup, tmp_path):
    """Every rank must agree before DDP's backward: a rank that skipped it alone would leave the
    others waiting in the gradient all-reduce (a hang with NCCL, an error or a hang with Gloo)."""
    script = tmp_path / "nan_on_one_rank.py"
    script.write_text(NAN_ON_ONE_RANK)
    # judged by what each rank wrote after its last step, not by the exit status: Gloo very rarely
    # aborts one process while the group is torn down, after all the work is done
    log = _launch(2, [str(script), str(setup["preset"]), str(setup["data"]), str(tmp_path / "out")], check=False)
    files = [tmp_path / f"out.rank{rank}.json" for rank in (0, 1)]
    assert all(f.is_file() for f in files), f"a rank did not finish its steps:\n{log[-4000:]}"
    results = [json.loads(f.read_text()) for f in files]
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["skipped"] == [False, True, False] for r in results), results
    assert results[0]["sum"] == results[1]["sum"] and results[0]["norm"] == results[1]["norm"]


@pytest.mark.parametrize("stopped", [1, 0])
def test_a_stopped_rank_ends_the_run_after_the_timeout_naming_the_rank(tmp_path, stopped):
    """One rank of two stopped mid-training (SIGSTOP: a debugger, a frozen node): the other stops
    after dist_timeout_minutes with one line naming the rank that did not answer, instead of waiting
    Gloo's default 30 minutes. Rank 0 names it; another rank can only say that rank 0 did not
    confirm the others. The ranks are started here, as torchrun starts them, so that the test holds
    every process and can stop one."""
    data, preset, out = _fake_fashion_mnist(tmp_path / "data"), _preset_file(tmp_path), tmp_path / "out"
    argv = [sys.executable, "-m", "glowflow", "train", "--preset", preset, "--data", str(data), "--out", str(out),
            "--max-steps", "100000", "--set", "dist_timeout_minutes=0.1"]
    group = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    ranks = [subprocess.Popen(argv, env=dict(_env(), **group, RANK=str(r), LOCAL_RANK=str(r)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
             for r in (0, 1)]
    live = 1 - stopped
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and "bits_per_dim" in metrics.read_text()):  # a step trained
            assert ranks[0].poll() is None and time.monotonic() < deadline, ranks[0].communicate()[0][-4000:]
            time.sleep(0.1)
        os.kill(ranks[stopped].pid, signal.SIGSTOP)
        try:
            output = ranks[live].communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank {live} still waits, 60 s after rank {stopped} stopped")
        assert ranks[live].returncode == 1, output[-4000:]
        error = next((line for line in output.splitlines() if line.startswith("glowflow train: error:")), output)
        named = "rank 1 did not answer" if live == 0 else "rank 0 did not confirm that every rank answered"
        assert f"rank {live} of 2 waited" in error and named in error, output[-4000:]
        assert "dist_timeout_minutes = 0.1" in error and "Traceback" not in output, output[-4000:]
    finally:
        for rank in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(rank.pid, signal.SIGKILL)  # a stopped process dies of SIGKILL too
            rank.communicate()
