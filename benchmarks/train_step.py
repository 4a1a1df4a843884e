"""Benchmark: samples/s of one training step on the CPU, several ways, next to MONAI.

Run from the repository root as ``.venv/bin/python benchmarks/train_step.py``.

It times the pure training step of :meth:`scarce.train.Trainer.train_step` (forward,
``SegmentationLoss("dice_ce", 2)``, backward, gradient clipping, AdamW) of the default model
``build_model("unet", 1, 2, depth=4, width=32, norm="batch", dropout=0.0,
upsampling="transpose")`` on batches made beforehand (random crops of z-scored
``../shared/data/nist_rpe`` images and masks). Configurations (``--configs``): ``eager`` (1
process x 2 threads, float32, the baseline), ``channels_last`` (NHWC model and batches),
``compile`` (``torch.compile``; compile time reported apart, empty inductor cache), ``bf16``
(CPU autocast), ``ddp`` and ``ddp_<mode>`` (2 processes x 1 thread, DistributedDataParallel
over gloo, the same batch per process: samples/s = 2 x batch x steps / time) and ``monai``
(MONAI ``BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(32, 32, 64, 128,
256, 32))``, same loss and optimiser, eager, 1 x 2 threads).

The 2 shared vCPUs swing 2-4x in speed for minutes, so each configuration is built and warmed
up once, then timed in rounds (A B C ... A B C ...); the figure of merit is the median over
rounds of the ratio to ``eager`` in the same round. The two DDP processes live for the whole
run and sleep on a queue while the others run. Results: ``benchmarks/results/train_step.json``
and ``train_step.md``.

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
from scarce.losses import SegmentationLoss  # noqa: E402
from scarce.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "nist_rpe"
CONFIGS = ("eager", "channels_last", "compile", "bf16", "ddp", "ddp_channels_last", "monai")
MODES = {"eager": "eager", "channels_last": "channels_last", "compile": "torch.compile",
         "bf16": "bf16 autocast"}
LABELS = {"monai": "MONAI BasicUNet, 1 x 2 threads, eager",
          **{m: f"1 process x 2 threads, {t}" for m, t in MODES.items()},
          "ddp": "2 DDP processes x 1 thread, eager",
          **{f"ddp_{m}": f"2 DDP processes x 1 thread, {t}" for m, t in MODES.items() if m != "eager"}}
LEARNING_RATE, WEIGHT_DECAY, GRAD_CLIP = 3e-4, 1e-4, 1.0  # the TrainConfig defaults
IMAGES, DISTINCT = 32, 4  # nist_rpe images to crop from; distinct batches cycled through


def load_pairs(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Read the first ``count`` nist_rpe image/mask pairs (sorted by name), z-scored per image.

    Returns
    -------
    images : numpy.ndarray
        ``(N, 1, H, W)`` float32, each image with zero mean and unit standard deviation.
    masks : numpy.ndarray
        ``(N, H, W)`` int64 class maps (0 background, 1 cells).

    Raises
    ------
    FileNotFoundError
        If ``../shared/data/nist_rpe`` (next to the repository) is missing.
    """
    if not (DATA / "images").is_dir():
        raise FileNotFoundError(f"expected the nist_rpe data set at {DATA} (images/ and masks/); "
                                "put it there or run from a checkout next to shared/data")
    masks = {stem_of(p): p for p in list_image_files(DATA / "masks")}
    images, labels = [], []
    for file in list_image_files(DATA / "images")[:count]:
        image = read_image(file).astype(np.float32)  # (1, H, W)
        images.append((image - image.mean()) / max(float(image.std()), 1e-6))
        labels.append(read_mask(masks[stem_of(file)]).astype(np.int64))
    return np.stack(images), np.stack(labels)


def make_batches(images: np.ndarray, masks: np.ndarray, batch: int, patch: int, count: int,
                 rng: np.random.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
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
        raise ValueError(f"patch {patch} is larger than the images ({h} x {w}); use --patch "
                         f"<= {min(h, w)}")
    out = []
    for _ in range(count):
        idx = rng.integers(n, size=batch)
        ys, xs = rng.integers(h - patch + 1, size=batch), rng.integers(w - patch + 1, size=batch)
        x = np.stack([images[i, :, y:y + patch, c:c + patch] for i, y, c in zip(idx, ys, xs)])
        t = np.stack([masks[i, y:y + patch, c:c + patch] for i, y, c in zip(idx, ys, xs)])
        out.append((torch.from_numpy(x), torch.from_numpy(t)))
    return out


def build_network(kind: str, seed: int) -> torch.nn.Module:
    """The default Scarce U-Net (``kind="scarce"``) or MONAI's BasicUNet (``kind="monai"``)."""
    torch.manual_seed(seed)
    if kind == "monai":
        from monai.networks.nets import BasicUNet

        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2,
                         features=(32, 32, 64, 128, 256, 32))
    return build_model("unet", 1, 2, depth=4, width=32, norm="batch", dropout=0.0,
                       upsampling="transpose")


@dataclass
class Variant:
    """One configuration: the model, how it is called, and its optimiser."""

    name: str
    model: torch.nn.Module
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    channels_last: bool = False
    amp: bool = False


def make_variant(name: str, seed: int) -> Variant:
    """Build configuration ``name`` (one of ``CONFIGS``).

    A ``ddp`` prefix wraps the model in DistributedDataParallel (the process group must
    exist); the suffix picks the mode: ``channels_last``, ``compile``, ``bf16`` or none (eager).
    """
    mode = name.removeprefix("ddp").lstrip("_")
    model = build_network("monai" if name == "monai" else "scarce", seed)
    if mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    forward = model
    if name.startswith("ddp"):  # called in the DDP processes only
        forward = torch.nn.parallel.DistributedDataParallel(model)
    if mode == "compile":
        forward = torch.compile(forward)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    return Variant(name, model, forward, optimizer, mode == "channels_last", amp=mode == "bf16")


def train_step(v: Variant, loss_fn: torch.nn.Module, image: torch.Tensor,
               target: torch.Tensor) -> float:
    """One optimiser step as the Scarce trainer takes it; returns the loss.

    ``image`` is ``(B, 1, P, P)`` float32 and ``target`` ``(B, P, P)`` int64.
    """
    if v.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    v.model.train()
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if v.amp else contextlib.nullcontext()
    with amp:
        logits = v.forward(image)  # (B, 2, P, P)
    loss = loss_fn(logits.float(), target)
    v.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(v.model.parameters(), GRAD_CLIP)
    v.optimizer.step()
    return float(loss.detach())


def run_steps(v: Variant, loss_fn: torch.nn.Module, batches: list, steps: int) -> float:
    """Take ``steps`` training steps (cycling through ``batches``); return the seconds taken."""
    start = time.perf_counter()
    for i in range(steps):
        train_step(v, loss_fn, *batches[i % len(batches)])
    return time.perf_counter() - start


def training_gflop(kind: str, patch: int) -> tuple[float, int]:
    """Forward + backward GFLOP for one ``patch`` x ``patch`` sample, and the parameter count.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix
    products; a multiply-add is 2 FLOP).
    """
    model = build_network(kind, 0)
    x = torch.zeros(1, 1, patch, patch)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 1e9, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------- DDP
def ddp_worker(rank: int, args: argparse.Namespace, port: int, commands: list, results) -> None:
    """One DDP process (1 thread): build, then serve ``(name, steps)`` commands until ``None``.

    Rank 0 puts the seconds between two barriers around ``steps`` steps on ``results``.
    """
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        batches = make_batches(*load_pairs(IMAGES), args.batch, args.patch, DISTINCT,
                               np.random.default_rng([args.seed, rank]))
        variants = {n: make_variant(n, args.seed) for n in args.configs if n.startswith("ddp")}
        loss_fn = SegmentationLoss("dice_ce", 2)
        while (command := commands[rank].get()) is not None:
            dist.barrier()
            seconds = run_steps(variants[command[0]], loss_fn, batches, command[1])
            dist.barrier()
            if rank == 0:
                results.put(seconds)
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
        self.context = mp.spawn(ddp_worker, args=(args, port, self.commands, self.results),
                                nprocs=2, join=False)

    def run(self, name: str, steps: int) -> float:
        """Seconds rank 0 took for ``steps`` synchronised steps of configuration ``name``.

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
def warm_up(args, timer, notes: list) -> tuple[list[str], dict]:
    """Warm every configuration up; return the ones that work and the warm-up seconds.

    A ``compile`` configuration that fails (no working compiler, an unsupported operator) is
    dropped and explained in ``notes``; its first step (compiling) is timed apart.
    """
    seconds, kept = {}, []
    for name in args.configs:
        try:
            if name.endswith("compile"):  # the first step compiles forward and backward graphs
                seconds[f"{name}_first_step"] = timer(name, 1)
            seconds[name] = timer(name, args.warmup)
            kept.append(name)
        except Exception as err:  # noqa: BLE001 - a failed compile is reported, not fatal
            if not name.endswith("compile"):
                raise
            notes.append(f"{name} failed and was skipped: {type(err).__name__}: {err}")
        print(f"warm-up {name}: {seconds.get(name, float('nan')):.1f} s", flush=True)
    return kept, seconds


def measure(args: argparse.Namespace) -> dict:
    """Warm every configuration up, then time ``args.rounds`` rounds of all of them."""
    torch.set_num_threads(2)
    batches = make_batches(*load_pairs(IMAGES), args.batch, args.patch, DISTINCT,
                           np.random.default_rng([args.seed, 0]))
    loss_fn, notes, rounds = SegmentationLoss("dice_ce", 2), [], []
    pool = DDPPool(args)
    try:
        variants = {n: make_variant(n, args.seed) for n in args.configs if not n.startswith("ddp")}

        def timer(name: str, steps: int) -> float:
            if name.startswith("ddp"):
                return pool.run(name, steps)
            return run_steps(variants[name], loss_fn, batches, steps)

        order, warm = warm_up(args, timer, notes)
        for r in range(args.rounds):
            row = {"load_1min_before": os.getloadavg()[0]}
            for name in order:
                procs = 2 if name.startswith("ddp") else 1
                row[name] = procs * args.batch * args.steps / timer(name, args.steps)
            row["ratio_to_eager"] = {n: row[n] / row["eager"] for n in order}
            rounds.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{n} {row[n]:.2f}" for n in order), flush=True)
    finally:
        pool.close()
    return {"warm_up_s": warm, "rounds": rounds, "order": order, "notes": notes}


def summarize(result: dict, batch: int) -> dict:
    """Medians over rounds of samples/s and of the per-round ratio to ``eager``; GFLOP/s.

    Also sets ``result["compile_s"]``: each compiled configuration's first step minus its
    median step, an estimate of the compile time in seconds.
    """
    out, result["compile_s"] = {}, {}
    for name in result["order"]:
        rates = [r[name] for r in result["rounds"]]
        ratios = [r["ratio_to_eager"][name] for r in result["rounds"]]
        gflop = result["gflop_per_sample"]["monai" if name == "monai" else "scarce"]
        out[name] = {"median_samples_per_s": statistics.median(rates),
                     "median_ratio_to_eager": statistics.median(ratios),
                     "min_ratio": min(ratios), "max_ratio": max(ratios),
                     "median_gflop_per_s": statistics.median(rates) * gflop}
        first = result["warm_up_s"].get(f"{name}_first_step")
        if first is not None:
            procs = 2 if name.startswith("ddp") else 1
            step = procs * batch / out[name]["median_samples_per_s"]
            result["compile_s"][name] = {"first_step_s": first, "compile_s": first - step}
    return out


def machine() -> dict:
    """CPU model, logical CPU count, OS, and library versions."""
    import monai

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")]
    model = names[0] if names else platform.processor()

    return {"cpu": model, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "monai": monai.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def conclusion(summary: dict, loads: list[float]) -> str:
    """One paragraph written from the numbers: the fastest Scarce configuration, DDP advice.

    A median ratio within 10 % of 1 is called a tie: single rounds on this shared machine vary
    by more than that. ``loads`` are the 1-minute load averages before each round.
    """
    ratio = {n: r["median_ratio_to_eager"] for n, r in summary.items() if n != "monai"}
    fastest = max(ratio, key=ratio.get)
    if ratio[fastest] > 1.1:
        text = (f"Fastest way to train the default Scarce model here: **{LABELS[fastest]}**, "
                f"median {ratio[fastest]:.2f}x the 1 x 2 eager baseline of the same round.")
    else:
        text = (f"No configuration beat 1 process x 2 threads eager by more than 10 % (best: "
                f"{LABELS[fastest]}, {ratio[fastest]:.2f}x).")
    if "ddp" in ratio:
        verdict = ("faster: on a CPU-only machine, train with `scarce train --nproc <cores>` "
                   "(torchrun, one intra-op thread per process)" if ratio["ddp"] > 1.1 else
                   "slower: keep one process" if ratio["ddp"] < 0.9 else "no clear difference")
        text += (f" 2 DDP processes x 1 thread ran at {ratio['ddp']:.2f}x the speed of 1 process"
                 f" x 2 threads ({verdict}).")
    if "monai" in summary:
        m, e = summary["monai"], summary["eager"]
        text += (f" MONAI's BasicUNet (a smaller network) trained {m['median_ratio_to_eager']:.2f}"
                 f"x as many samples/s, at {m['median_gflop_per_s']:.0f} GFLOP/s against "
                 f"{e['median_gflop_per_s']:.0f} for the Scarce U-Net in eager mode.")
    if statistics.median(loads) > 3:
        text += (f" Caveat: other jobs kept the load at {statistics.median(loads):.1f} on these "
                 "CPUs, so each process got a share of the CPUs by its number of busy threads "
                 "and these ratios say little about a quiet machine.")
    return text


def write_markdown(result: dict, path: Path) -> None:
    """Write the results as a markdown report (command, machine, tables, conclusion)."""
    a, m, s, order = result["settings"], result["machine"], result["summary"], result["order"]
    loads = ", ".join(f"{r['load_1min_before']:.1f}" for r in result["rounds"])
    lines = [
        "# Training step throughput on the CPU", "",
        f"Command: `{result['command']}` ({result['date']}, {result['wall_time_s']:.0f} s).", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['platform']}; Python "
        f"{m['python']}, torch {m['torch']}, MONAI {m['monai']}, OMP_WAIT_POLICY="
        f"{m['omp_wait_policy']}. 1-minute load average before each round: {loads} (other jobs "
        "share these CPUs).", "",
        f"Step: forward + dice_ce loss + backward + gradient clipping + AdamW, batch {a['batch']}"
        f" per process, {a['patch']} x {a['patch']} crops of z-scored nist_rpe images; "
        f"{a['warmup']} warm-up step(s), then {a['rounds']} rounds of {a['steps']} timed steps "
        f"per configuration. Scarce U-Net: {result['params']['scarce']:,} parameters, "
        f"{result['gflop_per_sample']['scarce']:.1f} GFLOP per sample (forward + backward); MONAI "
        f"BasicUNet: {result['params']['monai']:,} parameters, "
        f"{result['gflop_per_sample']['monai']:.1f} GFLOP per sample.", "",
        "| configuration | median samples/s | median ratio to eager (min-max) | median GFLOP/s |",
        "|---|---:|---:|---:|"]
    for name in order:
        r = s[name]
        lines.append(f"| {LABELS[name]} | {r['median_samples_per_s']:.2f} | "
                     f"{r['median_ratio_to_eager']:.2f} ({r['min_ratio']:.2f}-"
                     f"{r['max_ratio']:.2f}) | {r['median_gflop_per_s']:.0f} |")
    lines += ["", "Samples/s per round:", "", "| round | load | " + " | ".join(order) + " |",
              "|---:" * (len(order) + 2) + "|"]
    for i, r in enumerate(result["rounds"]):
        lines.append(f"| {i + 1} | {r['load_1min_before']:.1f} | "
                     + " | ".join(f"{r[n]:.2f}" for n in order) + " |")
    lines.append("")
    for name, c in result["compile_s"].items():
        lines.append(f"{name}: first step {c['first_step_s']:.0f} s, of which about "
                     f"{c['compile_s']:.0f} s compiling (empty inductor cache).")
    lines += [f"Note: {note}" for note in result["notes"]]
    lines += ["", "## Conclusion", "", result["conclusion"], ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the benchmark, write the JSON and markdown results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="samples per step and per process")
    p.add_argument("--patch", type=int, default=128, help="crop side, pixels (<= 256)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds over all configurations")
    p.add_argument("--steps", type=int, default=1, help="timed steps per configuration and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated, 'eager' first; from {sorted(LABELS)}")
    p.add_argument("--seed", type=int, default=0, help="model weights and crops")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    args.configs = args.configs.split(",")
    if min(args.batch, args.rounds, args.steps, args.warmup) < 1:
        p.error("--batch, --rounds, --steps and --warmup must be >= 1")
    if args.patch % 16 or not 16 <= args.patch <= 256:
        p.error(f"--patch must be a multiple of 16 between 16 and 256, got {args.patch}")
    if args.configs[0] != "eager" or not set(args.configs) <= set(LABELS):
        p.error(f"--configs must start with 'eager' and name only {sorted(LABELS)}; "
                f"got {args.configs}")
    start = time.perf_counter()
    flops = {k: training_gflop(k, args.patch) for k in ("scarce", "monai")}
    with tempfile.TemporaryDirectory() as cache:  # compile from scratch, as a first run does
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        result = measure(args)
    result.update(command=" ".join([".venv/bin/python", "benchmarks/train_step.py",
                                    *(sys.argv[1:] if argv is None else argv)]),
                  date=time.strftime("%Y-%m-%d %H:%M %Z"), machine=machine(),
                  settings={**vars(args), "out": str(args.out)},
                  gflop_per_sample={k: v[0] for k, v in flops.items()},
                  params={k: v[1] for k, v in flops.items()})
    result["summary"] = summarize(result, args.batch)
    result["conclusion"] = conclusion(result["summary"],
                                      [r["load_1min_before"] for r in result["rounds"]])
    result["wall_time_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "train_step.md")
    print(result["conclusion"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
