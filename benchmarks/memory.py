"""Peak memory and speed of one training step for K = 8, 16, 32 under each memory mode; prints JSON.

A training step is forward + backward of the mean bits/dim + an Adam step. For each K the three modes
("none", "checkpoint", "invertible") are built with the same weights and timed interleaved (one step
of each in turn, ``--iters`` rounds, median), so machine load hits them alike.

Memory, in bytes above what the model holds anyway (parameters, their gradients pre-allocated by a
warm-up step, Adam's state), i.e. activations and temporaries:

* CUDA: ``torch.cuda.max_memory_allocated`` during the step, minus ``memory_allocated`` before it.
* CPU: the peak of live bytes in torch's allocation timeline, recorded by ``torch.profiler`` with
  ``profile_memory=True`` (every CPU tensor allocation and free, in order), during forward + backward.
  Also ``saved_tensor_bytes``: distinct storages autograd keeps for backward after the forward pass
  (``torch.autograd.graph.saved_tensors_hooks``). The latter does not see inside "checkpoint", whose
  own hooks take precedence, so it is reported there only for completeness.

    .venv/bin/python benchmarks/memory.py                        # 3x32x32, L=3, width 64, batch 8 (CPU)
    .venv/bin/python benchmarks/memory.py --out benchmarks/results/memory_cpu.json
    .venv/bin/python benchmarks/memory.py --hidden 512 --batch 64   # CIFAR-10 paper width, on a GPU
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import glowflow
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import glowflow
from glowflow.io import atomic_write_text
from glowflow.memory import MEMORY_MODES
from glowflow.model import Glow

TARGET_PEAK_RATIO = 1.3  # invertible: peak(K=32) / peak(K=8)
TARGET_TIME_RATIO = 1.6  # invertible step time / plain step time


def saved_tensor_bytes(loss_fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``loss_fn()`` builds its
    graph; then runs backward, so the stored graph is shown to suffice. What a memory mode saves."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(storages.values())


def _parse_ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(args, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit-valued images in [0, 1] and their dequantisation noise, ``[B, C, H, W]`` each."""
    g = torch.Generator().manual_seed(seed)
    shape = (args.batch, *args.shape)
    x = torch.randint(0, 256, shape, generator=g) / 255.0
    return x.to(device), torch.rand(shape, generator=g).to(device)


def _build(args, steps: int, memory: str, device: torch.device) -> tuple[Glow, torch.optim.Optimizer]:
    model = Glow(image_shape=tuple(args.shape), levels=args.levels, steps=steps, hidden_channels=args.hidden,
                 coupling=args.coupling, permutation=args.permutation, memory=memory, seed=0).to(device)
    x, noise = _batch(args, device, seed=1)
    with torch.no_grad():
        model(x, noise=noise)  # data-dependent init, identical for every mode
    model.train()
    return model, torch.optim.Adam(model.parameters(), lr=1e-5)


def _forward_backward(model: Glow, x: torch.Tensor, noise: torch.Tensor) -> None:
    model(x, noise=noise).bits_per_dim.mean().backward()


def _train_step(model: Glow, opt: torch.optim.Optimizer, x: torch.Tensor, noise: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=False)
    _forward_backward(model, x, noise)
    opt.step()


def _cpu_peak_bytes(model: Glow, x: torch.Tensor, noise: torch.Tensor) -> int:
    """Peak of live bytes allocated during forward + backward, from the profiler's allocation timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _forward_backward(model, x, noise)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def _measure_memory(model: Glow, x: torch.Tensor, noise: torch.Tensor, device: torch.device) -> dict:
    """Activation memory of forward + backward; gradients already allocated (zeroed, not freed)."""
    model.zero_grad(set_to_none=False)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _forward_backward(model, x, noise)
        _sync(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base}
    peak = _cpu_peak_bytes(model, x, noise)
    saved = saved_tensor_bytes(lambda: model(x, noise=noise).bits_per_dim.mean())
    return {"peak_bytes": peak, "saved_tensor_bytes": saved}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads or device.type == "cpu":
        # one thread by default on CPU: a second one mostly waits on the first when other jobs share
        # the cores, which makes timings far noisier than they are slower
        torch.set_num_threads(args.threads or 1)
    x, noise = _batch(args, device, seed=2)
    results = []
    for steps in args.steps:
        models = {mode: _build(args, steps, mode, device) for mode in args.modes}
        # the same first step for every mode: memory, and float32 gradients against the plain path
        grads = {}
        for mode, (model, _) in models.items():
            _forward_backward(model, x, noise)  # warm-up; allocates .grad
            row = {"steps": steps, "memory": mode, **_measure_memory(model, x, noise, device)}
            model.zero_grad(set_to_none=False)
            _forward_backward(model, x, noise)
            grads[mode] = [p.grad.detach().clone() for p in model.parameters()]
            results.append(row)
        for row in results[-len(models):]:
            if "none" in grads:
                row["grad_max_rel_diff_vs_none"] = max(
                    _max_rel(g, r) for g, r in zip(grads[row["memory"]], grads["none"]))
        # speed, interleaved
        wall = {mode: [] for mode in models}
        cpu = {mode: [] for mode in models}
        for mode, (model, opt) in models.items():
            for _ in range(args.warmup):
                _train_step(model, opt, x, noise)
        for _ in range(args.iters):
            for mode, (model, opt) in models.items():
                _sync(device)
                w0, c0 = time.perf_counter(), time.process_time()
                _train_step(model, opt, x, noise)
                _sync(device)
                wall[mode].append(time.perf_counter() - w0)
                cpu[mode].append(time.process_time() - c0)
        for row in results[-len(models):]:
            t = statistics.median(wall[row["memory"]])
            row.update(step_time_s=round(t, 4), steps_per_s=round(1.0 / t, 3),
                       step_times_s=[round(v, 4) for v in wall[row["memory"]]])
            if device.type == "cpu":
                row["step_cpu_time_s"] = round(statistics.median(cpu[row["memory"]]), 4)
        params = sum(p.numel() * p.element_size() for p in next(iter(models.values()))[0].parameters())
        for row in results[-len(models):]:
            row["parameter_bytes"] = params
        print(json.dumps({k: v for k, v in results[-1].items() if k != "step_times_s"}), file=sys.stderr)
        del models

    by = {(r["steps"], r["memory"]): r for r in results}
    k_lo, k_hi = min(args.steps), max(args.steps)
    peak_ratio = {m: round(by[k_hi, m]["peak_bytes"] / by[k_lo, m]["peak_bytes"], 3) for m in args.modes}
    def ratios(key: str) -> dict:
        if "none" not in args.modes:
            return {}
        return {f"K={k}": {m: round(by[k, m][key] / by[k, "none"][key], 3) for m in args.modes} for k in args.steps}

    # on CPU the process's CPU time: with one thread it is the step's own work, whatever else runs
    time_key = "step_cpu_time_s" if device.type == "cpu" else "step_time_s"
    time_ratio = ratios(time_key)
    out = {
        "benchmark": "memory",
        "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": {"image_shape": list(args.shape), "levels": args.levels, "steps": args.steps,
                   "hidden_channels": args.hidden, "coupling": args.coupling, "permutation": args.permutation,
                   "batch_size": args.batch, "iters": args.iters, "warmup": args.warmup, "dtype": "float32"},
        "memory_measure": (
            "cuda.max_memory_allocated during forward+backward minus memory_allocated before it" if device.type == "cuda"
            else "peak live bytes of torch's CPU allocation timeline (torch.profiler, profile_memory=True) during "
                 "forward+backward"
        ) + " (parameters, pre-allocated gradients and Adam state excluded); step time = forward + backward + "
            "Adam step, median of interleaved iterations; on CPU the ratios use process CPU time (one thread), "
            "which other jobs on the machine do not inflate as they do wall-clock time",
        "results": results,
        f"peak_ratio_K{k_hi}_over_K{k_lo}": peak_ratio,
        "time_ratio_over_none": time_ratio,
        "time_ratio_measure": time_key + " (median)",
        "wall_time_ratio_over_none": ratios("step_time_s"),
    }
    if "invertible" in args.modes and "none" in args.modes:
        worst_time = max(v["invertible"] for v in time_ratio.values())
        out["targets"] = {
            f"invertible_peak_ratio <= {TARGET_PEAK_RATIO}": peak_ratio["invertible"] <= TARGET_PEAK_RATIO,
            f"invertible_time_ratio <= {TARGET_TIME_RATIO} (worst K)": worst_time <= TARGET_TIME_RATIO,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=_parse_ints, default=[3, 32, 32], help="C,H,W")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--steps", type=_parse_ints, default=[8, 16, 32], help="K values, e.g. 8,16,32")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--coupling", default="affine", choices=["affine", "additive"])
    p.add_argument("--permutation", default="invconv", choices=["invconv", "invconv_lu", "shuffle", "reverse"])
    p.add_argument("--modes", default=",".join(MEMORY_MODES), help="comma-separated memory modes")
    p.add_argument("--iters", type=int, default=7, help="timed steps per mode (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: 1 on CPU, torch's default on CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MEMORY_MODES]
    if bad or len(args.shape) != 3 or not args.steps:
        p.error(f"modes must be among {MEMORY_MODES} (got {bad}); --shape is C,H,W; --steps non-empty")
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
