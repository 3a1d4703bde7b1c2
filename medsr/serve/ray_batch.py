"""A batch of ``medsr-infer`` spread over a Ray cluster (``medsr-infer INPUTS... -o DIR --ray ADDRESS``;
docs/scale-out.md).

The driver plans the batch exactly as a local batch does (medsr.engine.jobs.plan_batch: the same output names), then
hands one volume at a time to each actor of a pool. Each actor holds one engine (opened on its first volume that
passes its checks, with ``num_gpus=1`` when the device is cuda) and runs the same per-job function as the local
batch (medsr.engine.jobs.run_batch_job): the worker reads the input and writes the output itself, atomically, never
over an existing file without ``--overwrite``, and returns the same record. The driver shows a bar over volumes,
prints each record as it arrives and keeps ``DIR/medsr_summary.json`` current (records in input order, as a local
batch writes them), so a rerun resumes by skipping the outputs that exist. The files therefore have to be on a
filesystem every node sees at the same path (the driver's working directory included, for relative paths).

An actor that dies (a killed or crashed worker process, a lost node) is restarted by Ray and its volume retried
(:data:`RETRIES` times), after removing the temporaries a killed writer can leave (hidden ``.<output>.*.tmp*``,
medsr.io.atomic); a volume that kills its worker every time fails as a job, and the batch goes on. Outputs are those
of a local run, bit for bit, for the same engine, precision and threads per worker (only the run's date in the
provenance differs).

Ray is imported only here, only when a Ray batch runs: without it, a one-line error says to install medsr[ray].
Torch-free: imports medsr.engine, medsr.bundle, medsr.io and medsr.errors only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from medsr.engine.jobs import (
    EngineOptions,
    InferSettings,
    new_summary,
    plan_batch,
    run_batch_job,
    write_summary,
)
from medsr.errors import BackendError, InputError, MedsrError

#: How many times a volume is retried on a restarted actor after its worker died running it.
RETRIES = 2

#: Fault injection for the tests: a directory where a file ``once`` makes the first worker to remove it exit
#: abruptly (os._exit) in the middle of its volume, and a file named like an input makes every worker that runs that
#: input exit so; Ray must then restart the worker and retry the volume.
FAULT_ENV = "MEDSR_RAY_TEST_FAULTS"


class BatchWorker:
    """One actor of the pool: one bundle and one engine, running planned jobs one at a time.

    ``engine.engine`` ``auto`` (``--engine auto``, the default) is resolved here, on the worker's node, before its
    first job (medsr.engine.select.resolve_engine with ``engine.precision``): the engines installed and the device
    are the node's, not the driver's; the choice and its reason go into the settings every output records.
    """

    def __init__(self, bundle_root: str, engine: EngineOptions, settings: InferSettings, cwd: str):
        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative inputs and outputs mean what they meant to the driver
        self._bundle_root, self._engine, self._settings = bundle_root, engine, settings
        self._bundle = None
        self._pipeline = None
        self._job = None

    def _resolve_engine(self) -> None:
        from medsr.engine.select import AUTO_ENGINE, resolve_engine

        if self._engine.engine != AUTO_ENGINE:
            return
        choice = resolve_engine(AUTO_ENGINE, self._engine.device, self._engine.precision)
        self._engine = dataclasses.replace(self._engine, engine=choice.engine, precision=choice.precision)
        self._settings = dataclasses.replace(
            self._settings, engine=choice.engine, precision=choice.precision, engine_reason=choice.reason
        )

    def _open_pipeline(self):
        if self._pipeline is None:
            self._pipeline = self._engine.open(self._bundle)
        _injected_fault(self._job)
        return self._pipeline

    def run(self, job, output: str, record: dict) -> dict:
        """Run one planned job (medsr.engine.jobs.run_batch_job) and return its record."""
        from medsr.bundle import load_bundle

        if self._bundle is None:
            try:
                self._resolve_engine()
                self._bundle = load_bundle(self._bundle_root)
            except MedsrError as exc:  # e.g. no engine on this node, or the bundle is not at the same path on it
                return {**record, "status": "failed", "error": f"{job.source}: {exc}"}
        output, self._job = Path(output), job
        remove_leftovers(output)
        return run_batch_job(job, output, self._bundle, self._open_pipeline, self._settings, record)


def remove_leftovers(output: Path) -> None:
    """Delete the hidden temporaries a writer of ``output`` killed mid-write left next to it (medsr.io.atomic names
    them ``.<name>.<random>.tmp<suffixes>``). Safe within a batch: one job per output name, one writer per job."""
    for leftover in glob.glob(os.path.join(glob.escape(str(output.parent)), f".{glob.escape(output.name)}.*.tmp*")):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _injected_fault(job) -> None:
    faults = os.environ.get(FAULT_ENV)
    if not faults:
        return
    if os.path.exists(os.path.join(faults, Path(job.source).name)):
        os._exit(1)
    try:
        os.unlink(os.path.join(faults, "once"))
    except OSError:
        return
    os._exit(1)


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise BackendError(f"--ray needs Ray: pip install 'medsr[ray]' ({exc})") from exc
    return ray


def _connect(ray, address: str) -> bool:
    """Start (``local``) or join (``auto`` or an address) a cluster; True when this call started it."""
    if ray.is_initialized():  # a caller (a test, a notebook) already holds a cluster: use it
        return False
    kwargs = {"logging_level": logging.WARNING, "include_dashboard": False}
    try:
        if address == "local":
            ray.init(**kwargs)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"--ray {address}: cannot start or reach a Ray cluster: {first}") from exc
    return True


def _pool_size(ray, engine: EngineOptions, workers: int | None, jobs: int, local: bool) -> int:
    resources = ray.cluster_resources()
    if engine.device == "cuda":
        capacity, unit = int(resources.get("GPU", 0)), "GPU"
        if capacity == 0:
            raise BackendError("--device cuda: the Ray cluster has no GPU")
    else:
        capacity, unit = int(resources.get("CPU", 0) // engine.threads), f"{engine.threads}-thread worker"
    wanted = max(1, min(capacity, jobs)) if workers is None else min(workers, jobs)
    if local and wanted > capacity:  # the actors would wait for resources forever
        raise InputError(f"{wanted} Ray worker(s) asked for; this machine's cluster has room for {capacity} {unit}(s)")
    return wanted


def run_ray_batch(
    jobs: list,
    outdir: Path,
    bundle,
    settings: InferSettings,
    engine: EngineOptions,
    address: str,
    workers: int | None,
    echo: Callable[[dict], None],
) -> dict:
    """Run a batch into ``outdir`` (an existing directory) on the Ray cluster at ``address`` (``local`` starts one
    on this machine and stops it afterwards; ``auto`` or ``host:port`` joins one) with ``workers`` actors (None: as
    many as the cluster's GPUs, or CPUs / ``engine.threads``, allow, at most one per volume). ``engine.threads``
    (None: 1) is each actor's CPU share and its engine's thread count. ``echo(record)`` is called as each job ends.
    Returns the summary, written to ``outdir/medsr_summary.json`` as for a local batch.
    """
    from tqdm import tqdm

    ray = _import_ray()
    if engine.engine == "torch":
        raise InputError("--ray runs the exported engines; --engine torch runs locally only")
    engine = EngineOptions(engine.engine, engine.precision, engine.device, engine.sampler, engine.threads or 1)
    plan = plan_batch(jobs, outdir, bundle, settings)
    todo = [index for index, (_, _, record) in enumerate(plan) if "status" not in record]
    started = _connect(ray, address)
    actors = []
    try:
        size = _pool_size(ray, engine, workers, len(todo), local=address == "local") if todo else 0
        options = {
            "num_cpus": engine.threads,
            "num_gpus": 1 if engine.device == "cuda" else 0,
            "max_restarts": -1,
            "max_task_retries": RETRIES,
        }
        remote = ray.remote(BatchWorker).options(**options)
        actors = [remote.remote(str(bundle.root), engine, settings, os.getcwd()) for _ in range(size)]
        return _drive(ray, plan, todo, actors, outdir, new_summary(bundle), echo, tqdm)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _drive(ray, plan, todo, actors, outdir, summary, echo, tqdm) -> dict:
    """Keep every actor busy with one volume until all are done; record, echo and summarize each as it ends."""
    records: list[dict | None] = [None if "status" not in record else record for _, _, record in plan]
    pending, idle, running = list(reversed(todo)), list(actors), {}

    def finish(index: int, record: dict) -> None:
        records[index] = record
        bar.update()
        echo(record)
        write_summary(outdir, summary, [r for r in records if r is not None])

    with tqdm(total=len(plan), unit="volume", desc="super-resolving", disable=None) as bar:
        for index, record in enumerate(records):
            if record is not None:
                finish(index, record)
        while pending or running:
            while idle and pending:
                actor, index = idle.pop(), pending.pop()
                job, output, record = plan[index]
                running[actor.run.remote(job, str(output), record)] = (actor, index)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, index = running.pop(ref)
            idle.append(actor)
            try:
                record = ray.get(ref)
            except ray.exceptions.RayError as exc:
                job, _, record = plan[index]
                cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the worker's exception
                text = (str(cause).strip().splitlines() or [""])[0]
                if isinstance(exc, ray.exceptions.RayActorError):
                    what = f"died running it {RETRIES + 1} times"
                else:
                    what = "failed running it"
                record = {**record, "status": "failed", "error": f"{job.source}: the Ray worker {what}: {text}"}
            finish(index, record)
    write_summary(outdir, summary, records, finished=True)
    return summary
