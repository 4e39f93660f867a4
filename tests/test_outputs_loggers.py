"""MLflow and W&B loggers, offline, read back with each library's own reader."""

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from wandb.proto import wandb_internal_pb2

from distrl.config import load_config
from distrl.errors import ConfigError
from distrl.outputs.loggers import (
    MLFLOW_RUN_ID_FILE,
    WANDB_RUN_ID_FILE,
    MLflowSink,
    WandbSink,
    build_sinks,
    check_loggers,
    flat_params,
    split_table,
    tracking_uri,
)
from distrl.outputs.metrics import MetricsLogger

ROWS = [
    {"step": 1, "prompt": "Hi", "response": "hello there", "version": 1, "reward/total": 0.5},
    {"step": 1, "prompt": "Yo", "response": "hey", "version": 1, "reward/total": None},
]


def config(**overrides):
    return load_config("tiny", {"output.experiment": "loggers-test", **overrides})


def metric_steps(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_flat_params_are_dotted_fields_with_json_values():
    params = flat_params(config(**{"learner.lr": 3e-4}))
    assert params["learner.lr"] == "0.0003"
    assert params["model.name"] == "tiny-llama"
    assert params["data.validation"] == "null"
    assert json.loads(params["reward.components"])[0]["name"] == "diversity"
    assert all(isinstance(v, str) for v in params.values())


def test_split_table_keeps_first_seen_columns_and_fills_gaps():
    table = split_table([{"a": 1, "b": "x"}, {"b": "y", "c": 2.5}])
    assert table == {"columns": ["a", "b", "c"], "data": [[1, "x", None], [None, "y", 2.5]]}


def test_no_sinks_when_both_are_off(tmp_path):
    assert build_sinks(config(), tmp_path, resume=False) == []


def test_mlflow_sink_logs_params_metrics_and_samples_and_resume_continues_the_run(tmp_path):
    cfg = config(**{"output.mlflow": True})
    sink = MLflowSink(cfg, tmp_path)
    sink.scalars(1, {"reward/total": 0.5, "reward/my_pkg.rewards:score": 2.0})
    sink.samples(1, ROWS)
    sink.scalars(2, {"reward/total": 0.75})
    sink.close()
    run_id = (tmp_path / MLFLOW_RUN_ID_FILE).read_text().strip()
    assert run_id == sink.run_id

    client = MlflowClient(tracking_uri(tmp_path))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["learner.lr"] == "0.001"
    assert metric_steps(client, run_id, "reward/total") == [(1, 0.5), (2, 0.75)]
    assert metric_steps(client, run_id, "reward/my_pkg.rewards:score") == [(1, 2.0)]
    table = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/samples/step_000001.json")
    assert table == split_table(ROWS)

    # A resumed run directory continues the same MLflow run (iterations may change on resume).
    again = MLflowSink(config(**{"output.mlflow": True, "iterations": 9}), tmp_path, resume=True)
    assert again.run_id == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    again.scalars(3, {"reward/total": 1.0})
    again.close()
    experiment = client.get_experiment_by_name("loggers-test")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert metric_steps(client, run_id, "reward/total") == [(1, 0.5), (2, 0.75), (3, 1.0)]
    assert client.get_run(run_id).data.params["iterations"] == "4"  # params are the first run's


def test_mlflow_run_closed_by_an_exception_is_failed(tmp_path):
    sink = MLflowSink(config(), tmp_path)
    try:
        raise RuntimeError("learner died")
    except RuntimeError:
        sink.close()
    assert MlflowClient(tracking_uri(tmp_path)).get_run(sink.run_id).info.status == "FAILED"


def test_mlflow_resume_of_a_run_id_the_store_lacks_says_what_to_do(tmp_path):
    (tmp_path / MLFLOW_RUN_ID_FILE).write_text("0123456789abcdef\n")
    with pytest.raises(Exception, match=f"delete .*{MLFLOW_RUN_ID_FILE}"):
        MLflowSink(config(), tmp_path, resume=True)


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file: a 7-byte W&B header, then LevelDB log records in 32 KiB
    blocks (7-byte header: CRC, length, type 1 full / 2 first / 3 middle / 4 last) holding
    ``wandb_internal_pb2.Record`` messages."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        parts = payload if kind in (1, 2) else parts + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def wandb_runs(run_dir: Path) -> list[dict]:
    """Each offline run folder's run id, config, history ``{step: {key: value}}`` and tables."""
    runs = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (file,) = folder.glob("run-*.wandb")
        run = {"history": {}, "tables": []}
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                run["project"] = record.run.project
                run["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                run["history"].setdefault(record.history.step.num, {}).update(items)
        for table in sorted((folder / "files" / "media" / "table").glob("*.table.json")):
            run["tables"].append(json.loads(table.read_text()))
        runs.append(run)
    return runs


def test_wandb_sink_logs_offline_and_resume_continues_the_run(tmp_path):
    cfg = config(**{"output.wandb": True})
    sink = WandbSink(cfg, tmp_path)
    sink.scalars(1, {"reward/total": 0.5, "learner/kl": 0.01})
    sink.samples(1, ROWS)
    sink.scalars(2, {"reward/total": 0.75})
    sink.close()
    run_id = (tmp_path / WANDB_RUN_ID_FILE).read_text().strip()

    (first,) = wandb_runs(tmp_path)
    assert first["id"] == run_id and first["project"] == "loggers-test"
    assert first["config"]["learner"]["lr"] == 0.001
    assert first["history"][1]["reward/total"] == 0.5
    assert first["history"][1]["learner/kl"] == 0.01
    assert first["history"][1]["samples/_type"] == "table-file"
    assert first["history"][2]["reward/total"] == 0.75
    (table,) = first["tables"]
    assert table["columns"] == list(ROWS[0])
    assert [row[2] for row in table["data"]] == ["hello there", "hey"]

    again = WandbSink(cfg, tmp_path, resume=True)
    again.scalars(3, {"reward/total": 1.0})
    again.close()
    runs = wandb_runs(tmp_path)
    assert [r["id"] for r in runs] == [run_id, run_id]  # `wandb sync` uploads them as one run
    assert runs[1]["history"][3]["reward/total"] == 1.0


def test_metrics_logger_feeds_both_sinks(tmp_path):
    cfg = config(**{"output.mlflow": True, "output.wandb": True})
    logger = MetricsLogger(tmp_path, tensorboard=False, sinks=build_sinks(cfg, tmp_path, False))
    logger.log(1, {"reward/total": 0.5, "learner/kl": float("nan")})
    logger.log_samples(1, [{k: v for k, v in r.items() if k != "step"} for r in ROWS])
    logger.close()
    client = MlflowClient(tracking_uri(tmp_path))
    run_id = (tmp_path / MLFLOW_RUN_ID_FILE).read_text().strip()
    assert metric_steps(client, run_id, "reward/total") == [(1, 0.5)]
    assert client.get_metric_history(run_id, "learner/kl") == []  # NaN is not a value
    (run,) = wandb_runs(tmp_path)
    assert run["history"][1]["reward/total"] == 0.5 and "learner/kl" not in run["history"][1]


@pytest.mark.parametrize(("module", "field"), [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_missing_package_names_the_field_and_the_extra(tmp_path, monkeypatch, module, field):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ConfigError) as err:
        build_sinks(config(**{f"output.{field}": True}), tmp_path, resume=False)
    assert f"output.{field} is on" in str(err.value)
    assert f"pip install 'distrl[{field}]'" in str(err.value)
    # distrl.loop.driver.train runs this check before Ray starts.
    with pytest.raises(ConfigError, match=f"pip install 'distrl\\[{field}\\]'"):
        check_loggers(config(**{f"output.{field}": True}))
    check_loggers(config())  # nothing on: nothing needed


NETWORK_PROBE = textwrap.dedent(
    """
    import socket, sys
    from pathlib import Path

    def audit(event, args):  # active until the interpreter is gone: exit handlers are seen too
        if event == "socket.getaddrinfo" or (
            event == "socket.connect" and args[0].family != socket.AF_UNIX
        ):
            print("NETWORK", event, args[:2], flush=True)

    sys.addaudithook(audit)
    from distrl.config import load_config
    from distrl.outputs.loggers import build_sinks

    config = load_config("tiny", {"output.mlflow": True, "output.wandb": True})
    for resume in (False, True):
        for sink in build_sinks(config, Path(sys.argv[1]), resume):
            sink.scalars(1, {"reward/total": 0.5})
            sink.samples(1, [{"step": 1, "prompt": "a", "response": "b"}])
            sink.close()
    print("LOGGED", flush=True)
    """
)


def test_loggers_open_no_network_connection_and_let_the_process_exit(tmp_path):
    # Neither the CI markers nor pytest's variable (both turn MLflow's telemetry off by
    # themselves) reach the child: it runs as a user's training process would.
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_CURRENT_TEST")}
    env.pop("MLFLOW_DISABLE_TELEMETRY", None)
    env.pop("MLFLOW_ALLOW_FILE_STORE", None)
    result = subprocess.run(
        [sys.executable, "-c", NETWORK_PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,  # wandb's service process left running would hold the exit
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOGGED" in result.stdout and "NETWORK" not in result.stdout, result.stdout


@pytest.mark.slow  # two runs on Ray
def test_training_run_and_its_resume_log_to_one_mlflow_run_and_one_wandb_id(ray_session, tmp_path):
    from distrl.loop.driver import train

    overrides = {
        "output.dir": str(tmp_path / "run"),
        "output.progress": False,
        "output.plots": False,
        "output.mlflow": True,
        "output.wandb": True,
        "iterations": 2,
    }
    run_dir = train(load_config("tiny", overrides))
    client = MlflowClient(tracking_uri(run_dir))
    run_id = (run_dir / MLFLOW_RUN_ID_FILE).read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert [m.step for m in client.get_metric_history(run_id, "reward/total")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "learner/policy_loss")] == [1, 2]
    samples = client.list_artifacts(run_id, "samples")
    assert [a.path for a in samples] == ["samples/step_000001.json", "samples/step_000002.json"]
    (wandb_run,) = wandb_runs(run_dir)
    assert sorted(wandb_run["history"]) == [1, 2]
    assert "reward/total" in wandb_run["history"][2]

    train(load_config("tiny", {**overrides, "iterations": 3}), resume=True)
    experiment = client.get_experiment_by_name("distrl")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert [m.step for m in client.get_metric_history(run_id, "reward/total")] == [1, 2, 3]
    assert client.get_run(run_id).info.status == "FINISHED"
    first, resumed = wandb_runs(run_dir)
    assert first["id"] == resumed["id"] and sorted(resumed["history"]) == [3]
