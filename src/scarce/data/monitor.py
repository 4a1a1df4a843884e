"""How fast the readers deliver: starvation while training, throughput on demand.

:class:`StarvationMonitor` wraps the trainer's batch stream and times every wait for the next
batch; :func:`measure_batches` measures how many batches per second a running stream delivers
(``scarce benchmark-readers`` builds the stream in :mod:`scarce.segment.readers`).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class StarvationMonitor:
    """Yield the items of ``iterable`` and time every wait for the next one.

    When a wait exceeds ``threshold_ms`` it logs (WARNING, once per episode)
    ``Input queue starvation: waited X ms for batch N (Y% of step time)``, with ``N`` the
    0-based count of batches delivered before and ``Y = wait / (wait + compute)``, compute
    being the time the consumer spent since it received the previous batch. The next wait
    below the threshold logs ``Input queue starvation over`` (INFO). The first wait (worker
    start-up) is kept in ``startup_seconds`` and neither logged nor counted.

    Parameters
    ----------
    iterable : iterable
        Typically a :class:`scarce.segment.readers.TrainBatches`.
    threshold_ms : float
        Wait above which the consumer is starving, milliseconds (>= 0).
    logger : logging.Logger, optional
        Defaults to this module's logger (``scarce.data.monitor``).

    Attributes
    ----------
    batches : int
        Items delivered so far.
    starving : bool
        Whether the last wait was above the threshold.
    startup_seconds : float
        The first wait, seconds.

    Raises
    ------
    ValueError
        If ``threshold_ms`` is negative.

    References
    ----------
    The "input-bound" diagnosis of the TensorFlow profiler's input-pipeline analyser (time
    the step waits on input / step time).
    """

    def __init__(self, iterable, threshold_ms: float = 50.0, logger: logging.Logger | None = None):
        if threshold_ms < 0:
            raise ValueError(f"threshold_ms must be >= 0 (milliseconds), got {threshold_ms}")
        self.iterable, self.threshold_s = iterable, threshold_ms / 1000.0
        self.logger = logger or log
        self.batches, self.starving, self.startup_seconds = 0, False, 0.0
        self._wait = 0.0  # summed waits since the last reset, seconds
        self._since: float | None = None  # time of the last reset (None before the first item)
        self._last: float | None = None  # time the previous item was handed over

    def __iter__(self):
        iterator = iter(self.iterable)
        while True:
            asked = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self._record(asked, time.perf_counter())
            yield item

    def _record(self, asked: float, got: float) -> None:
        wait = got - asked
        if self._last is None:  # worker start-up: not a starvation
            self.startup_seconds, self._since = wait, got
        else:
            self._wait += wait
            starving = wait > self.threshold_s
            if starving and not self.starving:
                share = 100.0 * wait / max(got - self._last, 1e-12)  # wait / (wait + compute)
                self.logger.warning(
                    "Input queue starvation: waited %.0f ms for batch %d (%.0f%% of step time)",
                    wait * 1000.0,
                    self.batches,
                    share,
                )
            elif self.starving and not starving:
                self.logger.info("Input queue starvation over")
            self.starving = starving
        self._last = got
        self.batches += 1

    def wait_fraction(self, reset: bool = True) -> float:
        """Summed waits / elapsed time since the last reset (0 before the first item).

        Parameters
        ----------
        reset : bool
            Start a new interval now.

        Returns
        -------
        float
            In [0, 1]; the share of wall time the consumer spent waiting for batches.
        """
        now = time.perf_counter()
        elapsed = 0.0 if self._since is None else now - self._since
        fraction = self._wait / elapsed if elapsed > 0 else 0.0
        if reset and self._since is not None:
            self._wait, self._since = 0.0, now
        return fraction


def measure_batches(batches, *, seconds: float, warmup_batches: int, batch_size: int) -> dict:
    """Draw batches from a running stream for ``seconds`` and report the rate.

    Parameters
    ----------
    batches : iterator
        A started batch stream (e.g. :class:`scarce.data.workers.TrainBatches`).
    seconds : float
        Measuring time after the warm-up, seconds (> 0).
    warmup_batches : int
        Batches drawn first and not timed (workers started, queues full).
    batch_size : int
        Samples per batch, to turn batches/s into samples/s.

    Returns
    -------
    dict
        ``patches_per_second``, ``batches_per_second``, ``seconds_per_batch`` (s),
        ``batch_size``, ``batches`` (timed) and ``seconds`` (measured wall time).

    Raises
    ------
    ValueError
        If ``seconds`` <= 0.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    for _ in range(warmup_batches):
        next(batches)
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        next(batches)
        done += 1
    return {
        "patches_per_second": done * batch_size / elapsed,
        "batches_per_second": done / elapsed,
        "seconds_per_batch": elapsed / max(done, 1),
        "batch_size": batch_size,
        "batches": done,
        "seconds": elapsed,
    }


def format_benchmark(result: dict) -> str:
    """One line for :func:`benchmark_readers`'s result (``scarce benchmark-readers``).

    Parameters
    ----------
    result : dict
        As returned by :func:`benchmark_readers`.

    Returns
    -------
    str
        E.g. ``2 reader(s), 8 x 256x256 patches: 650.0 augmented patches/s, ...``.
    """
    p = result["patch_size"]
    return (
        f"{result['reader_count']} reader(s), {result['batch_size']} x {p}x{p} patches: "
        f"{result['patches_per_second']:.1f} augmented patches/s, "
        f"{result['batches_per_second']:.2f} batches/s, "
        f"{1000.0 * result['seconds_per_batch']:.1f} ms per batch "
        f"({result['batches']} batches in {result['seconds']:.1f} s)"
    )


__all__ = ["StarvationMonitor", "format_benchmark", "measure_batches"]
