"""Benchmark: samples/s of one training step on the CPU, several ways, next to MONAI.

Run from the repository root as ``.venv/bin/python benchmarks/train_step.py``.

It times the step of :meth:`scarce.engine.trainer.Trainer.train_step` (forward, dice_ce loss, backward,
gradient clipping, AdamW) for the default model (``build_model("unet", 1, 2)``: depth 4, width
32, batch norm, transposed convolutions) on batches made beforehand (random crops of z-scored
``../shared/data/nist_rpe`` images and masks) in the configurations of ``LABELS``: 1 process x
2 threads in eager float32 (the baseline), channels_last, ``torch.compile`` (empty inductor
cache; compile time reported apart) or bf16 autocast; 2 processes x 1 thread under
DistributedDataParallel (gloo, the same batch per process); MONAI's ``BasicUNet(features=(32,
32, 64, 128, 256, 32))`` with the same loss and optimiser. The shared vCPUs swing 2-4x in speed
for minutes, so every configuration is built and warmed up once, then timed in rounds (A B C
... A B C ...): the figure of merit is the median over rounds of the ratio to eager in the same
round. Results: ``benchmarks/results/train_step.json`` and ``train_step.md``.

References
----------
PyTorch performance tuning guide (channels_last, torch.compile, CPU autocast, threads) and
DistributedDataParallel documentation. M. J. Cardoso et al., "MONAI: An open-source framework
for deep learning in healthcare", arXiv:2211.02701 (2022), doi:10.48550/arXiv.2211.02701.
"""

from __future__ import annotations

import os

# before torch is imported; the DDP processes inherit it (OpenMP threads sleep when idle)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import queue  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from scarce.io import list_image_files, read_image, read_mask, stem_of  # noqa: E402
from scarce.models import build_model  # noqa: E402
from scarce.segment.losses import SegmentationLoss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "nist_rpe"
CONFIGS = (
    "eager",
    "channels_last",
    "compile",
    "bf16",
    "ddp",
    "ddp_channels_last",
    "ddp_bf16",
    "monai",
)
MODES = {"channels_last": "channels_last", "compile": "torch.compile", "bf16": "bf16 autocast"}
LABELS = {
    "eager": "1 process x 2 threads, eager",
    "ddp": "2 DDP processes x 1 thread, eager",
    "monai": "MONAI BasicUNet, 1 x 2 threads, eager",
    **{m: f"1 process x 2 threads, {t}" for m, t in MODES.items()},
    **{f"ddp_{m}": f"2 DDP processes x 1 thread, {t}" for m, t in MODES.items()},
}
LEARNING_RATE, WEIGHT_DECAY, GRAD_CLIP = 3e-4, 1e-4, 1.0  # the TrainConfig defaults
IMAGES, DISTINCT = 32, 4  # nist_rpe images to crop from; distinct batches cycled through


def load_pairs(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Read the first ``count`` nist_rpe image/mask pairs (sorted by name).

    Returns
    -------
    images, masks : numpy.ndarray
        ``(N, 1, H, W)`` float32, z-scored per image; ``(N, H, W)`` int64 classes {0, 1}.

    Raises
    ------
    FileNotFoundError
        If ``../shared/data/nist_rpe`` (next to the repository) is missing.
    """
    if not (DATA / "images").is_dir():
        raise FileNotFoundError(
            f"expected the nist_rpe data set at {DATA} (images/ and masks/); "
            "put it there or run from a checkout next to shared/data"
        )
    masks = {stem_of(p): p for p in list_image_files(DATA / "masks")}
    images, labels = [], []
    for file in list_image_files(DATA / "images")[:count]:
        image = read_image(file).astype(np.float32)  # (1, H, W)
        images.append((image - image.mean()) / max(float(image.std()), 1e-6))
        labels.append(read_mask(masks[stem_of(file)]).astype(np.int64))
    return np.stack(images), np.stack(labels)


def make_batches(
    images: np.ndarray,
    masks: np.ndarray,
    batch: int,
    patch: int,
    count: int,
    rng: np.random.Generator,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Draw ``count`` batches of random ``patch`` x ``patch`` crops (image and mask alike).

    Parameters
    ----------
    images, masks : numpy.ndarray
        ``(N, 1, H, W)`` float32 and ``(N, H, W)`` int64.
    batch, patch, count : int
        Crops per batch, crop side (pixels, at most H and W) and number of batches.
    rng : numpy.random.Generator
        Chooses the images and the crop corners.

    Returns
    -------
    list of (torch.Tensor, torch.Tensor)
        Images ``(B, 1, patch, patch)`` float32 and targets ``(B, patch, patch)`` int64.
    """
    n, _, h, w = images.shape
    if patch > min(h, w):
        raise ValueError(
            f"patch {patch} is larger than the images ({h} x {w}); use --patch <= {min(h, w)}"
        )
    out = []
    for _ in range(count):
        idx = rng.integers(n, size=batch)
        ys, xs = rng.integers(h - patch + 1, size=batch), rng.integers(w - patch + 1, size=batch)
        x = np.stack([images[i, :, y : y + patch, c : c + patch] for i, y, c in zip(idx, ys, xs)])
        t = np.stack([masks[i, y : y + patch, c : c + patch] for i, y, c in zip(idx, ys, xs)])
        out.append((torch.from_numpy(x), torch.from_numpy(t)))
    return out


def build_network(kind: str, seed: int) -> torch.nn.Module:
    """The default Scarce U-Net (``kind="scarce"``) or MONAI's BasicUNet (``kind="monai"``)."""
    torch.manual_seed(seed)
    if kind == "monai":
        from monai.networks.nets import BasicUNet

        return BasicUNet(
            spatial_dims=2, in_channels=1, out_channels=2, features=(32, 32, 64, 128, 256, 32)
        )
    return build_model(
        "unet", 1, 2, depth=4, width=32, norm="batch", dropout=0.0, upsampling="transpose"
    )


@dataclass
class Variant:
    """One configuration: the model, the module that runs it, and its optimiser."""

    model: torch.nn.Module
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    channels_last: bool = False
    amp: bool = False


def make_variant(name: str, seed: int) -> Variant:
    """Build configuration ``name`` (a key of ``LABELS``) with seeded initial weights.

    A ``ddp`` prefix wraps the model in DistributedDataParallel (the process group must exist);
    the suffix picks ``channels_last``, ``compile`` or ``bf16``; none is eager float32.
    """
    mode = name.removeprefix("ddp").lstrip("_")
    model = build_network("monai" if name == "monai" else "scarce", seed)
    if mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    forward = torch.nn.parallel.DistributedDataParallel(model) if name[:3] == "ddp" else model
    if mode == "compile":
        forward = torch.compile(forward)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    return Variant(model, forward, optimizer, mode == "channels_last", amp=mode == "bf16")


def train_step(
    v: Variant, loss_fn: torch.nn.Module, image: torch.Tensor, target: torch.Tensor
) -> float:
    """One optimiser step as the Scarce trainer takes it; returns the loss.

    ``image`` is ``(B, 1, P, P)`` float32, ``target`` ``(B, P, P)`` int64 class indices.
    """
    if v.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    v.model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16) if v.amp else contextlib.nullcontext():
        logits = v.forward(image)  # (B, 2, P, P)
    loss = loss_fn(logits.float(), target)
    v.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(v.model.parameters(), GRAD_CLIP)
    v.optimizer.step()
    return float(loss.detach())


def run_steps(v: Variant, loss_fn, batches: list, steps: int) -> tuple[float, float]:
    """Take ``steps`` steps, cycling through ``batches``.

    Returns
    -------
    wall, cpu : float
        Seconds of wall-clock time, and CPU seconds of all threads of this process.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        train_step(v, loss_fn, *batches[i % len(batches)])
    return time.perf_counter() - wall, time.process_time() - cpu


def training_gflop(kind: str, patch: int) -> tuple[float, int]:
    """Forward + backward GFLOP of one ``patch`` x ``patch`` sample, and the parameter count.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (a multiply-add is 2 FLOP).
    """
    model = build_network(kind, 0)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, patch, patch)).sum().backward()
    return counter.get_total_flops() / 1e9, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------- DDP
def ddp_worker(rank: int, args: argparse.Namespace, port: int, commands: list, results) -> None:
    """One DDP process (1 thread): build, then serve ``(name, steps)`` commands until ``None``.

    Rank 0 puts on ``results`` the wall seconds between two barriers around ``steps`` steps
    and the CPU seconds both processes spent in them.
    """
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        batches = make_batches(
            *load_pairs(IMAGES),
            args.batch,
            args.patch,
            DISTINCT,
            np.random.default_rng([args.seed, rank]),
        )
        variants = {n: make_variant(n, args.seed) for n in args.configs if n[:3] == "ddp"}
        loss_fn = SegmentationLoss("dice_ce", 2)
        while (command := commands[rank].get()) is not None:
            dist.barrier()
            wall, cpu = run_steps(variants[command[0]], loss_fn, batches, command[1])
            dist.barrier()
            cpu = torch.tensor([cpu], dtype=torch.float64)
            dist.all_reduce(cpu)
            if rank == 0:
                results.put((wall, float(cpu)))
    finally:
        dist.destroy_process_group()


class DDPPool:
    """Two persistent gloo DDP processes, 1 thread each, timed on request."""

    def __init__(self, args: argparse.Namespace):
        ctx = mp.get_context("spawn")
        self.commands, self.results = [ctx.Queue(), ctx.Queue()], ctx.Queue()
        with socket.socket() as s:  # a port that was free a moment ago
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.context = mp.spawn(
            ddp_worker, args=(args, port, self.commands, self.results), nprocs=2, join=False
        )

    def run(self, name: str, steps: int) -> tuple[float, float]:
        """Wall and CPU seconds of ``steps`` synchronised steps of configuration ``name``.

        Raises
        ------
        RuntimeError
            If a DDP process died (its traceback is printed above).
        """
        for q in self.commands:
            q.put((name, steps))
        while True:
            with contextlib.suppress(queue.Empty):
                return self.results.get(timeout=2)
            if not all(proc.is_alive() for proc in self.context.processes):
                raise RuntimeError(f"a DDP process died while running {name!r}; see above")

    def close(self) -> None:
        """Stop both processes and wait for them."""
        for q in self.commands:
            q.put(None)
        self.context.join()


# ------------------------------------------------------------------------------- benchmark
def measure(args: argparse.Namespace) -> dict:
    """Warm every configuration up, then time ``args.rounds`` rounds of all of them.

    A ``compile`` configuration that fails (no working compiler, an unsupported operator) is
    dropped with a note; its first step (compiling) is timed apart.
    """
    torch.set_num_threads(2)
    batches = make_batches(
        *load_pairs(IMAGES), args.batch, args.patch, DISTINCT, np.random.default_rng([args.seed, 0])
    )
    loss_fn, notes, rounds, warm, order = SegmentationLoss("dice_ce", 2), [], [], {}, []
    pool = DDPPool(args)
    try:
        variants = {n: make_variant(n, args.seed) for n in args.configs if n[:3] != "ddp"}

        def timer(name: str, steps: int) -> tuple[float, float]:
            if name[:3] == "ddp":
                return pool.run(name, steps)
            return run_steps(variants[name], loss_fn, batches, steps)

        for name in args.configs:
            try:
                if name.endswith("compile"):  # the first step compiles forward and backward
                    warm[f"{name}_first_step"] = timer(name, 1)[0]
                warm[name] = timer(name, args.warmup)[0]
                order.append(name)
            except Exception as err:  # noqa: BLE001 - a failed compile is reported, not fatal
                if not name.endswith("compile"):
                    raise
                notes.append(f"{name} failed and was skipped: {type(err).__name__}: {err}")
        for r in range(args.rounds):  # each round starts one configuration later
            row = {"load_1min_before": os.getloadavg()[0], "per_cpu_s": {}}
            for name in order[r % len(order) :] + order[: r % len(order)]:
                wall, cpu = timer(name, args.steps)
                samples = (2 if name[:3] == "ddp" else 1) * args.batch * args.steps
                row[name], row["per_cpu_s"][name] = samples / wall, samples / cpu
            row["ratio_to_eager"] = {n: row[n] / row["eager"] for n in order}
            rounds.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{n} {row[n]:.2f}" for n in order), flush=True)
    finally:
        pool.close()
    return {"warm_up_s": warm, "rounds": rounds, "order": order, "notes": notes}


def summarize(result: dict, batch: int) -> dict:
    """Per configuration, medians over rounds (samples/s, ratio to eager, GFLOP/s, per CPU-s).

    The ratio is taken to ``eager`` in the same round; the range of the ratios is kept.

    Also sets ``result["compile_s"]``: a compiled configuration's first step minus its median
    step, an estimate of the compile time (seconds).
    """
    out, result["compile_s"], rounds = {}, {}, result["rounds"]
    for name in result["order"]:
        rate = statistics.median(r[name] for r in rounds)
        ratios = [r["ratio_to_eager"][name] for r in rounds]
        out[name] = {
            "median_samples_per_s": rate,
            "median_ratio_to_eager": statistics.median(ratios),
            "min_ratio": min(ratios),
            "max_ratio": max(ratios),
            "median_gflop_per_s": rate
            * result["gflop_per_sample"]["monai" if name == "monai" else "scarce"],
            "median_samples_per_cpu_s": statistics.median(r["per_cpu_s"][name] for r in rounds),
        }
        first = result["warm_up_s"].get(f"{name}_first_step")
        if first is not None:
            step = (2 if name[:3] == "ddp" else 1) * batch / rate
            result["compile_s"][name] = {"first_step_s": first, "compile_s": first - step}
    return out


def machine() -> dict:
    """CPU model, logical CPU count, bf16 instruction sets, OS, and library versions."""
    import monai

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")]
    flags = next((x.split(":", 1)[1].split() for x in lines if x.startswith("flags")), [])
    return {
        "cpu": names[0] if names else platform.processor(),
        "logical_cpus": os.cpu_count(),
        "bf16_instructions": [f for f in ("avx512_bf16", "amx_bf16") if f in flags],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def conclusion(summary: dict, others: float, bf16_instructions: list[str]) -> str:
    """One paragraph written from the numbers: the fastest Scarce configuration, DDP advice.

    A median ratio within 10 % of 1 is called a tie: single rounds on this shared machine vary
    by more than that. ``others`` is the load of other jobs (see :func:`other_load`);
    ``bf16_instructions`` the CPU's bf16 instruction sets (a bf16 speed-up depends on them).
    """
    ratio = {n: r["median_ratio_to_eager"] for n, r in summary.items() if n != "monai"}
    best = max(ratio, key=ratio.get)
    text = (
        f"Fastest way to train the default Scarce model here: **{LABELS[best]}**, median "
        f"{ratio[best]:.2f}x the 1 x 2 eager baseline of the same round."
        if ratio[best] > 1.1
        else "No configuration beat 1 process x 2 threads eager by more than 10 % (best: "
        f"{LABELS[best]}, {ratio[best]:.2f}x)."
    )
    ties = [
        f"{LABELS[n]} ({ratio[n]:.2f}x)"
        for n in ratio
        if n != best and ratio[n] > 1.1 and ratio[n] * 1.1 >= ratio[best]
    ]
    if ties:
        text += " Within 10 % of it (a tie here): " + "; ".join(ties) + "."
    if "bf16" in ratio and ratio["bf16"] > 1.1:
        text += (
            f" bf16 autocast (`--amp bf16`) ran {ratio['bf16']:.2f}x eager; it relies on "
            f"this CPU's bf16 instructions ({', '.join(bf16_instructions) or 'none'}), so "
            "check it on other CPUs, and its effect on accuracy is not measured here."
        )
    if "ddp" in ratio:
        verdict = (
            "faster: on a CPU-only machine, train with `scarce train --nproc <cores>` "
            "(torchrun, one intra-op thread per process)"
            if ratio["ddp"] > 1.1
            else "slower: keep one process"
            if ratio["ddp"] < 0.9
            else "no clear difference"
        )
        busy = summary["eager"]["median_samples_per_s"] / (
            2 * summary["eager"]["median_samples_per_cpu_s"]
        )
        text += (
            f" 2 DDP processes x 1 thread ran at {ratio['ddp']:.2f}x the speed of 1 process"
            f" x 2 threads ({verdict}). The eager baseline's 2 threads ran {100 * busy:.0f} %"
            " of the wall time (samples/s / (2 x samples per CPU-second)); on an idle "
            "machine the rest is all that more processes could win back."
        )
    if "monai" in summary:
        m, e = summary["monai"], summary["eager"]
        text += (
            f" MONAI's BasicUNet (a smaller network) trained {m['median_ratio_to_eager']:.2f}"
            f"x as many samples/s, at {m['median_gflop_per_s']:.0f} GFLOP/s against "
            f"{e['median_gflop_per_s']:.0f} for the Scarce U-Net in eager mode."
        )
    if others > 1:
        text += (
            f" Caveat: other jobs kept about {others:.1f} threads busy on these CPUs; that "
            "slows every configuration and weighs most on 1 x 2 threads against 2 x 1 "
            "processes; samples per CPU-second are the steadier comparison."
        )
    return text


def other_load(result: dict) -> float:
    """Estimate how many threads other jobs kept busy during a run of this benchmark.

    The larger of the 1-minute load average before the run and the median one before the
    rounds less this run's own 2 busy threads.
    """
    rounds = statistics.median(r["load_1min_before"] for r in result["rounds"])
    return max(result["load_before"], rounds - 2)


def write_markdown(result: dict, path: Path) -> None:
    """Write the results as a markdown report (command, machine, tables, conclusion)."""
    a, m, s, order = result["settings"], result["machine"], result["summary"], result["order"]
    gflop, params = result["gflop_per_sample"], result["params"]
    lines = [
        "# Training step throughput on the CPU",
        "",
        f"Command: `{result['command']}` ({result['date']}, {result['wall_time_s']:.0f} s).",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs (bf16 instructions: "
        f"{', '.join(m['bf16_instructions']) or 'none'}), {m['platform']}; Python "
        f"{m['python']}, torch {m['torch']}, MONAI {m['monai']}, OMP_WAIT_POLICY="
        f"{m['omp_wait_policy']}. 1-minute load average before the run (other jobs): "
        f"{result['load_before']:.1f}; before each round (with this run's own 2 busy threads): "
        + ", ".join(f"{r['load_1min_before']:.1f}" for r in result["rounds"])
        + ".",
        "",
        f"Step: forward + dice_ce loss + backward + gradient clipping + AdamW, batch {a['batch']}"
        f" per process, {a['patch']} x {a['patch']} crops of z-scored nist_rpe images; "
        f"{a['warmup']} warm-up step(s), then {a['rounds']} rounds of {a['steps']} timed step(s) "
        f"per configuration. Scarce U-Net: {params['scarce']:,} parameters, "
        f"{gflop['scarce']:.1f} GFLOP per sample (forward + backward); MONAI BasicUNet: "
        f"{params['monai']:,} parameters, {gflop['monai']:.1f} GFLOP per sample.",
        "",
        "| configuration | median samples/s | median ratio to eager (min-max) | median GFLOP/s "
        "| median samples per CPU-second |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {LABELS[n]} | {s[n]['median_samples_per_s']:.2f} | "
        f"{s[n]['median_ratio_to_eager']:.2f} ({s[n]['min_ratio']:.2f}-"
        f"{s[n]['max_ratio']:.2f}) | {s[n]['median_gflop_per_s']:.0f} | "
        f"{s[n]['median_samples_per_cpu_s']:.2f} |"
        for n in order
    ]
    lines += [
        "",
        "Samples per CPU-second (all threads, all processes) depend less on other jobs"
        " than samples/s; an idle machine kept busy on both cores gives 2x it in samples/s.",
        "",
        "Samples/s per round:",
        "",
        "| round | load | " + " | ".join(order) + " |",
        "|---:" * (len(order) + 2) + "|",
    ]
    lines += [
        f"| {i + 1} | {r['load_1min_before']:.1f} | "
        + " | ".join(f"{r[n]:.2f}" for n in order)
        + " |"
        for i, r in enumerate(result["rounds"])
    ]
    lines.append("")
    lines += [
        f"{name}: first step {c['first_step_s']:.0f} s, of which about "
        f"{c['compile_s']:.0f} s compiling (empty inductor cache)."
        for name, c in result["compile_s"].items()
    ]
    lines += [f"Note: {note}" for note in result["notes"]]
    lines += ["", "## Conclusion", "", result["conclusion"], ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the benchmark, write the JSON and markdown results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4, help="samples per step and per process")
    p.add_argument("--patch", type=int, default=256, help="crop side, pixels (<= 256)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds over all configurations")
    p.add_argument("--steps", type=int, default=1, help="timed steps per configuration and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated, 'eager' first; from {sorted(LABELS)}",
    )
    p.add_argument("--seed", type=int, default=0, help="model weights and crops")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    args.configs = args.configs.split(",")
    if min(args.batch, args.rounds, args.steps, args.warmup) < 1:
        p.error("--batch, --rounds, --steps and --warmup must be >= 1")
    if args.patch % 16 or not 16 <= args.patch <= 256:
        p.error(f"--patch must be a multiple of 16 between 16 and 256, got {args.patch}")
    if args.configs[0] != "eager" or not set(args.configs) <= set(LABELS):
        p.error(
            f"--configs must start with 'eager' and name only {sorted(LABELS)}; got {args.configs}"
        )
    start, load = time.perf_counter(), os.getloadavg()[0]
    flops = {k: training_gflop(k, args.patch) for k in ("scarce", "monai")}
    with tempfile.TemporaryDirectory() as cache:  # compile from scratch, as a first run does
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        result = measure(args)
    result.update(
        command=" ".join(
            [
                ".venv/bin/python",
                "benchmarks/train_step.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        date=time.strftime("%Y-%m-%d %H:%M %Z"),
        machine=machine(),
        load_before=load,
        settings={**vars(args), "out": str(args.out)},
        gflop_per_sample={k: v[0] for k, v in flops.items()},
        params={k: v[1] for k, v in flops.items()},
    )
    result["summary"] = summarize(result, args.batch)
    result["conclusion"] = conclusion(
        result["summary"], other_load(result), result["machine"]["bf16_instructions"]
    )
    result["wall_time_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "train_step.md")
    print(result["conclusion"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
