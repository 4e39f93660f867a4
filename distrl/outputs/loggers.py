"""Optional experiment loggers fed by ``MetricsLogger``: MLflow and Weights & Biases, offline.

``output.mlflow`` logs to an MLflow file store in ``<run>/mlruns``; ``output.wandb`` logs a
W&B run in offline mode under ``<run>/wandb`` (upload it later with ``wandb sync``). Each
logger gets the run's config once, every step's finite scalars and the sample completions. A
``--resume`` of the run directory continues the same MLflow / W&B run: its id is kept in
``<run>/mlflow_run_id`` / ``<run>/wandb_run_id``. Neither logger opens a network connection:
both libraries' usage telemetry is switched off for the process before they are used.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from distrl.config import RunConfig
from distrl.config.schema import to_dict
from distrl.errors import ConfigError, DistrlError
from distrl.outputs.metrics import Record, Sink

MLFLOW_DIR = "mlruns"
MLFLOW_RUN_ID_FILE = "mlflow_run_id"
WANDB_RUN_ID_FILE = "wandb_run_id"
# MLflow refuses longer param values and more params per request.
_MLFLOW_PARAM_CHARS = 6000
_MLFLOW_BATCH = 100


def build_sinks(config: RunConfig, run_dir: Path, resume: bool) -> list[Sink]:
    """The loggers ``config.output`` turns on, each continuing its earlier run when ``resume``.

    Raises:
        ConfigError: a logger is on but its package is not installed (names the field and
            the pip extra).
    """
    wanted = [
        (config.output.mlflow, MLflowSink),
        (config.output.wandb, WandbSink),
    ]
    sinks: list[Sink] = []
    try:
        for on, cls in wanted:
            if on:
                sinks.append(cls(config, run_dir, resume=resume))
    except BaseException:
        for sink in sinks:  # e.g. MLflow started, then wandb is missing: end MLflow's run
            sink.close()
        raise
    return sinks


def check_loggers(config: RunConfig) -> None:
    """Before Ray starts: the packages of the loggers ``config.output`` turns on are installed.

    Raises:
        ConfigError: one is missing (names the field and the pip extra).
    """
    for on, module, field, extra in (
        (config.output.mlflow, "mlflow", "output.mlflow", "mlflow"),
        (config.output.wandb, "wandb", "output.wandb", "wandb"),
    ):
        loaded = module in sys.modules  # None there: an import that failed or was blocked
        if on and not (sys.modules[module] if loaded else importlib.util.find_spec(module)):
            raise ConfigError(
                f"{field} is on but the {module!r} package is not installed: "
                f"pip install 'distrl[{extra}]' (or set {field} false)"
            )


def flat_params(config: RunConfig) -> dict[str, str]:
    """The config as ``{"learner.lr": "0.001", ...}``: dotted field names, JSON values for
    anything but strings (lists such as ``reward.components`` as one JSON value)."""
    out: dict[str, str] = {}

    def walk(data: Any, prefix: str) -> None:
        if isinstance(data, dict) and prefix != "reward.components":
            for key, value in data.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        else:
            out[prefix] = data if isinstance(data, str) else json.dumps(data)

    walk(to_dict(config), "")
    return out


class MLflowSink:
    """One MLflow run in the file store ``<run_dir>/mlruns`` (experiment ``output.experiment``).

    Params: the flattened config, logged when the run is made (MLflow params cannot change, so
    a resumed run adds only fields it lacks). Metrics: every step's scalars. Samples: one JSON
    artifact per step, ``samples/step_000012.json``, in pandas' "split" layout
    (``{"columns": [...], "data": [[...], ...]}``).
    """

    def __init__(self, config: RunConfig, run_dir: Path, *, resume: bool = False) -> None:
        # The file store is in "maintenance mode" in MLflow 3 and refused unless allowed; it is
        # what needs no server and no database. Usage telemetry is read once, at import.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        mlflow = _require("mlflow", "output.mlflow", "mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.telemetry.client import set_telemetry_client

        set_telemetry_client()  # mlflow imported before the variable was set: off now too
        from mlflow.tracking import MlflowClient

        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri(self.run_dir)
        self.client = MlflowClient(self.tracking_uri)
        self._metric = Metric
        id_file = self.run_dir / MLFLOW_RUN_ID_FILE
        run_id = _read_id(id_file) if resume else None
        if run_id is None:
            experiment = self.client.get_experiment_by_name(config.output.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(config.output.experiment)
            )
            run = self.client.create_run(experiment_id, run_name=self.run_dir.name)
            run_id = run.info.run_id
            _write_id(id_file, run_id)
        else:
            try:
                run = self.client.get_run(run_id)
            except mlflow.exceptions.MlflowException:
                raise DistrlError(
                    f"{id_file} names MLflow run {run_id}, which {self.run_dir / MLFLOW_DIR} "
                    f"does not hold; delete {id_file} to start a new MLflow run"
                ) from None
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        params = [
            Param(key, value[:_MLFLOW_PARAM_CHARS])
            for key, value in flat_params(config).items()
            if key not in run.data.params
        ]
        for i in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(run_id, params=params[i : i + _MLFLOW_BATCH])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log one step's scalars as MLflow metrics at ``step``."""
        now = int(time.time() * 1000)
        metrics = [
            self._metric(_metric_name(key), float(value), now, int(step))
            for key, value in values.items()
        ]
        for i in range(0, len(metrics), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _MLFLOW_BATCH])

    def samples(self, step: int, rows: list[Record]) -> None:
        """Log one step's samples as the artifact ``samples/step_<step>.json``."""
        if rows:
            artifact = f"samples/step_{int(step):06d}.json"
            self.client.log_dict(self.run_id, split_table(rows), artifact)

    def close(self) -> None:
        """End the MLflow run: FINISHED, or FAILED / KILLED when closed by an exception."""
        status = {None: "FINISHED", KeyboardInterrupt: "KILLED"}.get(sys.exc_info()[0], "FAILED")
        self.client.set_terminated(self.run_id, status=status)


class WandbSink:
    """One W&B run in offline mode under ``<run_dir>/wandb`` (project ``output.experiment``).

    The config is the run's W&B config; scalars are logged with ``step=``; samples as a
    ``wandb.Table`` named ``samples``. A resumed run logs under the same run id into a new
    offline folder; ``wandb sync <run>/wandb/offline-run-*`` uploads them as one run.
    """

    def __init__(self, config: RunConfig, run_dir: Path, *, resume: bool = False) -> None:
        wandb = _require("wandb", "output.wandb", "wandb")
        self._wandb = wandb
        self.run_dir = Path(run_dir)
        settings = wandb.Settings(
            mode="offline",
            silent=True,
            console="off",  # distrl's output stays in the terminal, not copied into the run
            save_code=False,
            disable_code=True,
            disable_git=True,
            # No system monitor (it probes cloud metadata endpoints) and no host metadata.
            x_disable_stats=True,
            x_disable_meta=True,
            x_disable_machine_info=True,
        )
        # Process-wide settings: W&B's usage telemetry follows these, not the run's.
        wandb.setup(settings=settings)
        id_file = self.run_dir / WANDB_RUN_ID_FILE
        run_id = _read_id(id_file) if resume else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:8]  # W&B's own ids: 8 lowercase letters and digits
            _write_id(id_file, run_id)
        self.run = wandb.init(
            project=config.output.experiment,
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            config=to_dict(config),
            settings=settings,
        )
        self.run_id = run_id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log one step's scalars at ``step``."""
        self.run.log(dict(values), step=int(step))

    def samples(self, step: int, rows: list[Record]) -> None:
        """Log one step's samples as the table ``samples`` at ``step``."""
        if rows:
            table = split_table(rows)
            self.run.log(
                {"samples": self._wandb.Table(allow_mixed_types=True, **table)}, step=int(step)
            )

    def close(self) -> None:
        """Finish the run (exit code 1 when closed by an exception) and stop W&B's service
        process, so the training process exits when it is done."""
        failed = sys.exc_info()[0] is not None
        self.run.finish(exit_code=1 if failed else 0)
        self._wandb.teardown()


def tracking_uri(run_dir: Path) -> str:
    """The MLflow tracking URI of a run directory's file store (``file:///.../mlruns``)."""
    return (Path(run_dir) / MLFLOW_DIR).resolve().as_uri()


def split_table(rows: list[Record]) -> dict[str, list]:
    """Rows as ``{"columns": [...], "data": [[...], ...]}``: columns in first-seen order, a
    missing value as None."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return {"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}


def _metric_name(key: str) -> str:
    # MLflow metric names allow letters, digits and _ - . / : and space.
    return re.sub(r"[^\w\-./: ]", "_", key)


def _require(module: str, field: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"{field} is on but the {module!r} package is not installed: "
            f"pip install 'distrl[{extra}]' (or set {field} false)"
        ) from exc


def _read_id(path: Path) -> str | None:
    if not path.is_file():
        return None
    run_id = path.read_text(encoding="utf-8").strip()
    if not re.fullmatch(r"[\w-]+", run_id):
        raise DistrlError(f"{path}: {run_id!r} is not a run id; delete the file to start anew")
    return run_id


def _write_id(path: Path, run_id: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, path)
