"""The GPU acceptance run: what would crash or mislead on CUDA, each check in its own process.

For a machine with one CUDA GPU that has torch and Lightning but may lack torchrec, fbgemm, wandb
and pytest and cannot reach the network. Every step runs in a child process with its own time
limit and writes ``<out>/acceptance/<step>.json`` (``status``: pass / fail / skip, the numbers,
and the reason); a failing step does not stop the next; ``<out>/acceptance/summary.json`` lists
them all. ``--dry-run`` runs the same plumbing on the CPU at tiny sizes (CUDA-only checks skip with
their reason), which is what CI runs to keep this script working.

    python benchmarks/gpu_acceptance.py --out "$OUT"            # on the GPU machine (~10 min)
    python benchmarks/gpu_acceptance.py --out /tmp/acc --dry-run   # CPU: the plumbing

Steps (issue 20): ``env`` (versions, what is missing); ``parity`` (the reference model, fp32 with
TF32 off, GPU vs CPU in separate processes: losses and weights <= 1e-4; the GPU run on NCCL);
``precision`` (bf16-mixed and 16-mixed: finite, falling); ``fp16_skip`` (16-mixed with
``nonfinite_loss="skip"`` and a NaN batch: that step skipped, the rest trained); ``host_syncs``
(``torch.cuda.set_sync_debug_mode`` count per step); ``phase_times`` (the monitor's
``time/step_s`` against CUDA events the check records itself, a step apart); ``checkpoint`` (sync
and async save, resume, then ``lightning-hybrid convert`` in a CPU-only process);
``compressors`` (PowerSGD, top-k, fp16 on CUDA against the same call on CPU, and on the
overlapped exchange's worker thread and side stream against the direct call); ``loss_memory``
(peak memory of the full and sampled softmax step against the estimate); ``block_tflops``
(`gpu_block_tflops.py`: the reference block against ``nn.TransformerEncoderLayer``, >= 0.9x);
``tables`` (with torchrec: fused vs dense kernel, fbgemm's lazy Adam vs torch's on untouched rows).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = ["env", "parity", "precision", "fp16_skip", "host_syncs", "phase_times", "checkpoint", "compressors",
         "loss_memory", "block_tflops", "tables"]
LIMITS = {"parity": 150, "checkpoint": 150, "block_tflops": 180, "tables": 120}


class Skip(Exception):
    """A check that cannot run here; its message is the reason."""


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _device(dry: bool) -> str:
    if dry:
        return "cpu"
    if not _cuda():
        raise Skip("needs a CUDA GPU (run with --dry-run for the CPU plumbing)")
    return "cuda"


# -- a small fit of the reference model (plain nn.Embedding tables: no torchrec needed) -----------


def fit(accelerator: str, *, precision: str = "32-true", steps: int = 6, nan_step: int | None = None,
        nonfinite: str = "stop", sync_debug: bool = False, events: bool = False, ckpt_dir: str | None = None,
        async_ckpt: bool = False, resume: str | None = None, d_model: int = 32) -> dict[str, Any]:
    """Train the reference SASRec for ``steps`` steps on synthetic data; what the checks read."""
    import warnings

    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.sasrec import SASRec

    warnings.simplefilter("ignore")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out: dict[str, Any] = {"losses": [], "syncs": [], "monitor_step_s": [], "event_step_s": []}

    class NaNAt(SASRec):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if nan_step is not None and self.trainer.global_step == nan_step else loss

    class Watch(pl.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            out["backend"] = dist.get_backend() if dist.is_initialized() else None

        def on_train_batch_start(self, trainer: Any, module: Any, *args: Any) -> None:
            monitor = next((c for c in trainer.callbacks if type(c).__name__ == "HybridMonitor"), None)
            if events:  # read here, once the monitor has surely logged the step before (callback order)
                out["monitor_step_s"].append(monitor.last.get("time/step_s") if monitor is not None else None)
                self.start = torch.cuda.Event(enable_timing=True) if accelerator == "gpu" else time.perf_counter()
                if accelerator == "gpu":
                    self.start.record()
            if sync_debug:
                torch.cuda.set_sync_debug_mode("warn")
                self.caught = warnings.catch_warnings(record=True)
                self.records = self.caught.__enter__()
                warnings.simplefilter("always")

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
            if sync_debug:
                torch.cuda.set_sync_debug_mode(0)
                self.caught.__exit__(None, None, None)
                out["syncs"].append(sum("synchroniz" in str(w.message) for w in self.records))
            out["losses"].append(float(outputs["loss"]))
            if events:
                if accelerator == "gpu":
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    end.synchronize()
                    out["event_step_s"].append(self.start.elapsed_time(end) / 1000.0)
                else:
                    out["event_step_s"].append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    model = NaNAt(num_items=50, max_len=8, d_model=d_model, num_blocks=2, num_heads=2, dropout=0.0, tables="torch")
    data = SequenceDataModule(format="synthetic", max_len=8, batch_size=8, synthetic_users=64, synthetic_items=50, drop_last=True)
    strategy = HybridStrategy(launcher="subprocess", nonfinite_loss=nonfinite, async_checkpoint=async_ckpt)
    callbacks: list[Any] = [Watch()]
    if ckpt_dir is not None:  # saved at the last step (an async save is awaited at teardown)
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="final", every_n_train_steps=steps, save_top_k=-1))
    trainer = pl.Trainer(
        strategy=strategy, accelerator=accelerator, devices=1, precision=precision, max_steps=steps, limit_val_batches=0,
        logger=False, enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, default_root_dir=ckpt_dir or tempfile.mkdtemp(),
    )
    trainer.fit(model, datamodule=data, ckpt_path=resume)
    out["skipped"] = getattr(strategy, "skipped_steps", None)
    out["weights"] = [float(v) for p in model.parameters() for v in p.detach().float().flatten()[:8].cpu()]
    out["finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return out


def fit_in_child(accelerator: str, timeout: int = 120, env: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """`fit` in a fresh process (its own process group and CUDA context)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [sys.executable, __file__, "--fit", json.dumps({"accelerator": accelerator, **kwargs}), "--result", str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"fit({accelerator}, {kwargs}) failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def _max_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


# -- the checks ---------------------------------------------------------------------------------


def check_env(dry: bool) -> dict[str, Any]:
    import lightning
    import torch

    mods = ["torchrec", "fbgemm_gpu", "wandb", "pytest", "transformers", "jsonargparse"]
    out: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "lightning": lightning.__version__,
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if _cuda() else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if _cuda() else None,
        "missing": [m for m in mods if importlib.util.find_spec(m) is None],
    }
    if not dry and not _cuda():
        raise Skip("no CUDA GPU visible")
    return out


def check_parity(dry: bool) -> dict[str, Any]:
    accel = "cpu" if dry else ("gpu" if _device(dry) == "cuda" else "cpu")
    cpu = fit_in_child("cpu", env={"CUDA_VISIBLE_DEVICES": ""})
    dev = fit_in_child(accel)
    loss_diff, weight_diff = _max_diff(cpu["losses"], dev["losses"]), _max_diff(cpu["weights"], dev["weights"])
    out = {"loss_max_abs_diff": loss_diff, "weight_max_abs_diff": weight_diff, "backend": dev.get("backend"), "losses": dev["losses"]}
    assert loss_diff <= 1e-4 and weight_diff <= 1e-4, f"device vs CPU: losses {loss_diff:.2e}, weights {weight_diff:.2e} (bound 1e-4)"
    if not dry:
        assert dev.get("backend") == "nccl", f"the GPU run used {dev.get('backend')!r}, not NCCL"
    return out


def check_precision(dry: bool) -> dict[str, Any]:
    accel = "cpu" if dry else ("gpu" if _device(dry) == "cuda" else "cpu")
    out: dict[str, Any] = {}
    for precision in ["bf16-mixed"] + ([] if dry else ["16-mixed"]):  # (Lightning's 16-mixed is CUDA-only)
        run = fit_in_child(accel, precision=precision, steps=12)
        losses = run["losses"]
        falling = sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
        out[precision] = {"losses": losses, "finite": run["finite"], "falling": falling}
        assert run["finite"] and falling, f"{precision}: finite={run['finite']}, losses {losses}"
    return out


def check_fp16_skip(dry: bool) -> dict[str, Any]:
    if dry:
        raise Skip("Lightning's precision='16-mixed' (GradScaler) is CUDA-only; the CPU test is tests/test_errors.py::test_nonfinite_loss_skip_under_fp16_loss_scaling")
    _device(dry)
    run = fit_in_child("gpu", precision="16-mixed", steps=6, nan_step=2, nonfinite="skip")
    assert run["finite"] and run["skipped"] == 1, f"finite={run['finite']}, skipped={run['skipped']}"
    return {"skipped": run["skipped"], "losses": run["losses"]}


def check_host_syncs(dry: bool) -> dict[str, Any]:
    if dry:
        raise Skip("torch.cuda.set_sync_debug_mode counts CUDA synchronisations only")
    _device(dry)
    run = fit_in_child("gpu", steps=6, sync_debug=True)
    return {"syncs_per_step": run["syncs"], "median": sorted(run["syncs"])[len(run["syncs"]) // 2]}


def check_phase_times(dry: bool) -> dict[str, Any]:
    accel = "cpu" if dry else ("gpu" if _device(dry) == "cuda" else "cpu")
    run = fit_in_child(accel, steps=10, events=True, d_model=256 if not dry else 32)
    # monitor_step_s[i] is read as step i starts: step i-1's times on CPU, step i-2's on CUDA (a step late)
    lag = 1 if dry else 2
    pairs = [(m, e) for m, e in zip(run["monitor_step_s"][lag:], run["event_step_s"], strict=False) if m is not None][2:]
    ratios = [m / e for m, e in pairs if e > 0]
    median = sorted(ratios)[len(ratios) // 2] if ratios else float("nan")
    out = {"monitor_over_events": ratios, "median": median}
    assert 0.7 <= median <= 1.3, f"the monitor's time/step_s is {median:.2f}x the step's own events"
    return out


def check_checkpoint(dry: bool) -> dict[str, Any]:
    accel = "cpu" if dry else ("gpu" if _device(dry) == "cuda" else "cpu")
    out: dict[str, Any] = {}
    for mode in ("sync", "async"):
        root = tempfile.mkdtemp(prefix=f"acc_{mode}_")
        first = fit_in_child(accel, steps=4, ckpt_dir=root, async_ckpt=mode == "async")
        ckpt = os.path.join(root, "final.ckpt")
        resumed = fit_in_child(accel, steps=6, resume=ckpt, ckpt_dir=tempfile.mkdtemp())
        straight = fit_in_child(accel, steps=6)
        converted = os.path.join(root, "one.ckpt")
        cli = subprocess.run([sys.executable, "-m", "lightning_hybrid.cli", "convert", ckpt, converted], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert cli.returncode == 0, f"{mode}: convert on a CPU-only process failed: {cli.stderr[-1500:]}"
        diff = _max_diff(resumed["losses"], straight["losses"][4:])
        out[mode] = {"first_losses": first["losses"], "resume_loss_diff": diff, "converted_bytes": os.path.getsize(converted)}
        assert diff <= 1e-5, f"{mode}: the resumed run's losses differ from the uninterrupted run's by {diff:.2e}"
    return out


def check_compressors(dry: bool) -> dict[str, Any]:
    import torch

    from lightning_hybrid.comm import compress as C
    from lightning_hybrid.comm.overlap import CompressorThread

    dev = _device(dry)
    torch.manual_seed(0)
    grads = [torch.randn(256, 256), torch.randn(1024, 64), torch.randn(64)]
    names = [f"g{i}" for i in range(len(grads))]

    def two_ranks(method: str, extra: dict[str, Any]) -> Any:
        comp = C.build_compressor(C.GradientCompression(method=method, start_iter=0, **extra), None)
        comp.__class__ = type("TwoRanks", (comp.__class__,), {"world": property(lambda self: 2)})
        comp.all_gather = lambda t: [t, t.clone()]  # (two identical ranks: the mean is the input's own approximation)
        comp.all_reduce_sum = lambda t: t.mul_(2)
        comp.reduce_on_wire = True  # (fp16: the NCCL path, divided before the low-precision sum)
        return comp

    out: dict[str, Any] = {}
    for method, extra in (("powersgd", {"rank": 4}), ("topk", {"density": 0.01}), ("fp16", {})):
        results = []
        for device in ("cpu", dev):
            work = [g.to(device).clone() for g in grads]
            two_ranks(method, extra).reduce(work, names=names, iteration=5)
            results.append([w.cpu() for w in work])
        # on the worker thread of the overlapped exchange and DDP's hook: on CUDA its side stream
        # must wait for the stream that wrote the gradients (a long matmul queued just before),
        # and the caller's stream for the side stream's result
        thread = CompressorThread(two_ranks(method, extra))
        base = torch.randn(8192 if dev == "cuda" else 256, 8192 if dev == "cuda" else 256, device=dev)
        work = [g.to(dev) + (base @ base)[0, 0] * 0 for g in grads]
        thread.submit(work, work[0], names=names, iteration=5).wait()
        thread.close()
        results.append([w.cpu() for w in work])
        diff = max(float((a - b).abs().max()) for a, b in zip(results[0], results[1], strict=True))
        threaded = max(float((a - b).abs().max()) for a, b in zip(results[1], results[2], strict=True))
        out[method] = {"device_vs_cpu": diff, "worker_thread_vs_direct": threaded}
        assert diff <= 1e-4, f"{method}: {dev} differs from CPU by {diff:.2e}"
        assert threaded <= 1e-6, f"{method}: on the worker thread {dev} differs from the direct call by {threaded:.2e}"
    return out


def check_loss_memory(dry: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    from lightning_hybrid.models.losses import sampled_softmax_loss

    if dry:
        raise Skip("peak memory is read with torch.cuda.max_memory_allocated")
    _device(dry)
    rows, d, items = 8192, 64, 200_000
    hidden = torch.randn(rows, d, device="cuda", requires_grad=True)
    weight = torch.randn(items + 1, d, device="cuda", requires_grad=True)
    targets = torch.randint(1, items + 1, (rows,), device="cuda")
    out: dict[str, Any] = {}
    logits_bytes = rows * (items + 1) * 4
    for name, loss_fn in (
        ("full", lambda: F.cross_entropy(hidden @ weight.T, targets)),
        ("sampled_256", lambda: sampled_softmax_loss(hidden, targets, weight, num_negatives=256,
                                                     sampling_probs=torch.full((items + 1,), 1.0 / (items + 1), device="cuda"))),
    ):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn().backward()
        torch.cuda.synchronize()
        out[name] = {"peak_bytes": torch.cuda.max_memory_allocated() - base}
    # estimate for the full loss: logits, their log-softmax (saved) and their gradient: 3 copies
    out["full"]["estimate_bytes"] = 3 * logits_bytes
    ratio = out["full"]["peak_bytes"] / out["full"]["estimate_bytes"]
    out["full"]["peak_over_estimate"] = ratio
    assert 0.5 <= ratio <= 1.5, f"full softmax peak {ratio:.2f}x the 3-copy estimate"
    assert out["sampled_256"]["peak_bytes"] < logits_bytes / 50
    return out


def check_block_tflops(dry: bool, out_dir: Path) -> dict[str, Any]:
    args = ["--device", "cpu", "--smoke"] if dry else []
    if not dry:
        _device(dry)
    path = out_dir / "gpu_block_tflops.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_block_tflops.py"), *args, "--out", str(path)],
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(path.read_text())
    if not dry:
        ratios = [r.get("ratio") for r in result.get("rows", []) if r.get("ratio") is not None]
        assert ratios and min(ratios) >= 0.9, f"block / nn.TransformerEncoderLayer TFLOP/s {ratios} (target >= 0.9)"
    return result


def check_tables(dry: bool) -> dict[str, Any]:
    if importlib.util.find_spec("torchrec") is None or importlib.util.find_spec("fbgemm_gpu") is None:
        raise Skip("torchrec / fbgemm-gpu are not installed here")
    if dry:
        raise Skip("fused vs dense and fbgemm's lazy Adam run on CUDA tables; the CPU kernels are tested in tests/test_parity.py")
    _device(dry)
    raise Skip("torchrec present: run tests/test_gpu.py::test_single_gpu_fit_with_sharded_tables (pytest) for the sharded path")


CHECKS = {"env": check_env, "parity": check_parity, "precision": check_precision, "fp16_skip": check_fp16_skip,
          "host_syncs": check_host_syncs, "phase_times": check_phase_times, "checkpoint": check_checkpoint,
          "compressors": check_compressors, "loss_memory": check_loss_memory, "tables": check_tables}


def run_step(step: str, dry: bool, out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        result = check_block_tflops(dry, out_dir) if step == "block_tflops" else CHECKS[step](dry)
        record = {"status": "pass", "result": result}
    except Skip as why:
        record = {"status": "skip", "reason": str(why)}
    except AssertionError as err:
        record = {"status": "fail", "reason": str(err)}
    except Exception as err:  # noqa: BLE001 - the record says what broke; the next step still runs
        record = {"status": "fail", "reason": f"{type(err).__name__}: {err}"[-4000:]}
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny: the plumbing only (CUDA-only steps skip)")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--fit", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fit:  # a child: one fit, its result as JSON
        Path(args.result).write_text(json.dumps(fit(**json.loads(args.fit))))
        return 0
    out_dir = Path(args.out) / "acceptance"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.step:  # a child: one check
        (out_dir / f"{args.step}.json").write_text(json.dumps(run_step(args.step, args.dry_run, out_dir), indent=2))
        return 0
    summary: dict[str, Any] = {"dry_run": args.dry_run, "steps": {}}
    for step in [s for s in args.steps.split(",") if s]:
        if step not in STEPS:
            parser.error(f"--steps: unknown {step!r}; choose from {STEPS}")
        limit = LIMITS.get(step, 100)
        cmd = [sys.executable, __file__, "--step", step, "--out", args.out, *(["--dry-run"] if args.dry_run else [])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            path = out_dir / f"{step}.json"
            record = json.loads(path.read_text()) if path.exists() and proc.returncode == 0 else {
                "status": "fail", "reason": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
        except subprocess.TimeoutExpired:
            record = {"status": "fail", "reason": f"timed out after {limit} s"}
        summary["steps"][step] = record
        print(f"{step:14s} {record['status']:5s} {record.get('seconds', '')!s:>6s}  {record.get('reason', '')[:150]}", flush=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    failed = [s for s, r in summary["steps"].items() if r["status"] == "fail"]
    print(f"acceptance: {len(summary['steps']) - len(failed)} of {len(summary['steps'])} steps did not fail; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
