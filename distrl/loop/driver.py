"""``distrl.loop.driver.train``: from a checked config to a finished run directory.

Everything the user can get wrong (config, run directory, data, model, reward functions) is
checked before Ray starts; then the embedded Ray (loopback only) or the cluster is joined, the
run directory is locked, and ``distrl.loop.trainer.Trainer`` runs the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import ray
from ray.exceptions import ObjectStoreFullError, OutOfDiskError

from distrl.config import RunConfig, dump_yaml
from distrl.data.prompts import Prompts, prepare
from distrl.engines.vllm_engine import check_vllm
from distrl.errors import ConfigError, DistrlError
from distrl.loop.rundir import (
    CONFIG_FILE,
    RunLock,
    check_output_dir,
    check_resumed_config,
    checkpoint_to_resume,
    clear_unstarted_run,
    is_empty,
    resume_hint,
    stopped_before_first_step,
)
from distrl.loop.trainer import Report, Trainer
from distrl.outputs.loggers import build_sinks, check_loggers
from distrl.outputs.metrics import MetricsLogger
from distrl.rewards import RewardBatch, trial_score
from distrl.runtime import actors
from distrl.runtime.checkpoint import CheckpointWriteError, verify_checkpoint
from distrl.runtime.faults import Hung

# Set by Ray in the driver of a submitted job (``ray job submit``).
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def check_job_output_dir(config: RunConfig) -> None:
    """In a submitted job the working directory is Ray's temporary copy of the user's: refuse a
    run directory in it (no ``output.dir``, or a relative one).

    Raises:
        ConfigError: in a job, ``output.dir`` is empty or relative.
    """
    if os.environ.get(JOB_ENV) and not (
        config.output.dir and Path(config.output.dir).is_absolute()
    ):
        raise ConfigError(
            "in a Ray job, pass --output-dir as an absolute folder (on storage the head and the "
            "learner share): a relative one would be inside Ray's temporary copy of the working "
            "directory, which Ray deletes"
        )


def run_dir_for(config: RunConfig) -> Path:
    """The run directory: ``output.dir`` or ``./runs/<algo>-<timestamp>``."""
    if config.output.dir:
        return Path(config.output.dir)
    return Path("runs") / f"{config.algo}-{datetime.now():%Y%m%d-%H%M%S}"


def init_ray(config: RunConfig) -> None:
    """Attach to a running cluster (``resources.address``, or RAY_ADDRESS inside ``ray job
    submit``) or start an embedded local Ray; local-only options never go to a cluster."""
    if ray.is_initialized():
        return
    address = config.resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    with loopback_only(), quiet_local_start():
        context = ray.init(
            address="local",
            num_cpus=config.resources.num_cpus,
            object_store_memory=config.resources.object_store_memory,
        )
    if context.dashboard_url:  # the port Ray found free: 8265 unless another Ray holds it
        url = context.dashboard_url
        url = url if "://" in url else f"http://{url}"
        token = os.environ.get("RAY_AUTH_MODE") == "token"
        hint = " (token auth: `ray get-auth-token` prints the token)" if token else ""
        print(f"distrl: local Ray dashboard at {url}{hint}", flush=True)


# What Ray logs while it starts a local instance that distrl says itself, or need not say on every
# run: the notice that token authentication is on (Ray's default, kept; the embedded Ray listens
# on loopback only), and its dashboard line (replaced by distrl's, with the real URL).
_START_NOTICES = {
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is enabled for this Ray cluster",
    ),
    "ray._private.worker": ("Started a local Ray instance",),
}


class _DropNotices(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextlib.contextmanager
def quiet_local_start() -> Iterator[None]:
    """Drop Ray's start-up notices listed in ``_START_NOTICES`` while the embedded Ray starts;
    every other message, and every message afterwards, is logged as usual."""
    filters = [(logging.getLogger(name), _DropNotices(p)) for name, p in _START_NOTICES.items()]
    for logger, notice_filter in filters:
        logger.addFilter(notice_filter)
    try:
        yield
    finally:
        for logger, notice_filter in filters:
            logger.removeFilter(notice_filter)


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Start an embedded Ray that listens on loopback only.

    Ray has no bind-address setting: where its GCS, raylet, object manager, agents and every
    actor listen follows the node IP, which is loopback only in Ray's single-machine mode (its
    default on macOS and Windows). That mode is read from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
    once, when ``ray`` is imported, so the flag is set for this process and, through the
    variable, for every process ``ray.init`` starts; both are restored afterwards, so attaching
    to a cluster is unaffected. A client other than this driver then needs the same variable
    set to 0 to reach this Ray by address.
    """
    from ray._private import ray_constants

    name = getattr(ray_constants, "ENABLE_RAY_CLUSTERS_ENV_VAR", None)
    if name is None or not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        warnings.warn(
            f"Ray {ray.__version__} has no single-machine switch that distrl knows: the "
            f"embedded Ray may listen on every interface",
            stacklevel=3,
        )
        yield
        return
    saved_flag, saved_env = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(name)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[name] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def train(config: RunConfig, *, resume: bool = False, report: Report | None = None) -> Path:
    """Run (or resume) training as configured; returns the run directory.

    Args:
        config: the validated run config.
        resume: continue from the newest complete checkpoint in the run directory.
        report: called as ``report(step, metrics, checkpoint_or_None)`` after every iteration
            (Ray Tune trials pass the metrics on with ``tune.report``).
    """
    check_job_output_dir(config)
    run_dir = run_dir_for(config).resolve()
    check_output_dir(run_dir)
    # A resumed directory is locked first, so a run already in it is named before anything else.
    lock = RunLock(run_dir) if resume and run_dir.is_dir() else None
    try:
        checkpoint, restart = None, False
        if resume:
            checkpoint = checkpoint_to_resume(run_dir)
            check_resumed_config(run_dir, config)
        elif not is_empty(run_dir):
            restart = stopped_before_first_step(run_dir)
            if not restart:
                raise DistrlError(
                    f"output directory {run_dir} is not empty; pass --resume to continue "
                    f"that run or choose another --output-dir"
                )
        train_prompts, val_prompts = prepare(config)
        check_loggers(config)
        check_vllm(config.rollout.engine, config.model)
        examples = train_prompts.examples[:2]  # a trial of the user reward functions
        batch = RewardBatch.from_examples(examples, [""] * len(examples))
        trial_score(config.reward, batch, config.faults.score_timeout_s)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DistrlError(f"cannot write to output directory {run_dir}: {exc}") from None
        lock = lock or RunLock(run_dir)  # a second run on run_dir stops here, naming this PID
        if restart:
            if not stopped_before_first_step(run_dir):  # a run came and went meanwhile
                raise DistrlError(f"output directory {run_dir} is not empty (another run?)")
            clear_unstarted_run(run_dir)
            print(f"distrl: {run_dir} held a run that stopped before its first step; "
                  "starting afresh there", flush=True)  # fmt: skip
        return _train(config, run_dir, train_prompts, val_prompts, resume, checkpoint, report)
    finally:
        if lock is not None:
            lock.release()


def _train(
    config: RunConfig,
    run_dir: Path,
    train_prompts: Prompts,
    val_prompts: Prompts,
    resume: bool,
    checkpoint: Path | None,
    report: Report | None,
) -> Path:
    if not resume:
        if not is_empty(run_dir):  # checked again under the lock: a run started meanwhile?
            raise DistrlError(f"output directory {run_dir} is not empty (another run?)")
        try:
            dump_yaml(config, run_dir / CONFIG_FILE)
        except OSError as exc:
            raise DistrlError(f"cannot write to output directory {run_dir}: {exc}") from None
    init_ray(config)
    trainer = Trainer(config, run_dir, train_prompts, val_prompts)
    try:
        trainer.wait_started([trainer.learner], "the learner")
        ref = trainer.learner.sees.remote(str(run_dir / CONFIG_FILE))
        group = isinstance(trainer.learner, actors.LearnerGroup)
        # Every learner worker writes its shards into the checkpoints.
        if not all(actors.get(trainer.learner.every_rank(ref) if group else [ref])):
            raise DistrlError(
                f"a learner's node cannot see {run_dir}: on a multi-node cluster "
                f"output.dir must be on storage the head and the learner workers share"
            )
        if checkpoint is not None:
            trainer.restore(checkpoint)
            dump_yaml(config, run_dir / CONFIG_FILE)  # the run is starting: changes stand
            print(f"distrl: resuming {run_dir} at step {trainer.step}", flush=True)
        logger = MetricsLogger(
            run_dir,
            tensorboard=config.output.tensorboard,
            plots=config.output.plots,
            resume=resume,
            sinks=build_sinks(config, run_dir, resume),
        )
    except BaseException:
        trainer.shutdown()
        raise
    if resume:
        logger.truncate_after(trainer.step)
        logged = logger.history[-1]["step"] if logger.history else 0
        if checkpoint is not None and logged < trainer.step:  # died after the checkpoint
            meta = verify_checkpoint(checkpoint)
            if meta.get("step") == trainer.step:
                logger.log(trainer.step, meta.get("metrics", {}))
    try:
        trainer.run(logger, progress=config.output.progress, report=report)
    except Hung as err:
        raise Hung(f"{err}; {resume_hint(run_dir)}") from None
    except CheckpointWriteError as err:
        raise CheckpointWriteError(
            f"{err}; nothing saved before was changed (free space or fix the permission); "
            f"{resume_hint(run_dir)}"
        ) from None
    except (OutOfDiskError, ObjectStoreFullError) as err:
        name = "OutOfDiskError" if isinstance(err, OutOfDiskError) else "ObjectStoreFullError"
        raise DistrlError(
            f"Ray's object store is full and cannot spill to disk ({name}); "
            f"free disk space where Ray spills (its temp folder, /tmp/ray by default) or give "
            f"the run more store (resources.object_store_memory); {resume_hint(run_dir)}"
        ) from None
    finally:
        if config.output.plots:
            try:
                logger.plot()
            except OSError as exc:  # a full disk: the run's own error says what to do
                print(f"distrl: plots not drawn: {exc}", file=sys.stderr, flush=True)
        logger.close()
        trainer.shutdown()
    verify_checkpoint(run_dir / "final")
    plural = "" if trainer.step == 1 else "s"
    print(f"distrl: finished {trainer.step} iteration{plural}; outputs in {run_dir}", flush=True)
    return run_dir
