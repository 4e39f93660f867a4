"""``python -m distrl.clusters FILE...``: check cluster files before ``ray up`` or ``kubectl``.

A Ray cluster-launcher YAML is checked against Ray's own JSON schema (offline); a KubeRay
manifest must hold a RayJob or RayCluster with a head group; a job's runtime environment
(``ray job submit --runtime-env FILE``) must use Ray's fields with their types. Errors name the
file and, for YAML syntax, the line; for the schema, the field.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from distrl.config import cli
from distrl.errors import ConfigError

KUBERAY_KINDS = ("RayJob", "RayCluster")
# Fields only a cluster-launcher YAML has: a file with none of them is a runtime environment.
LAUNCHER_FIELDS = ("cluster_name", "provider", "available_node_types", "head_node_type", "auth")


def read_yaml_documents(path: Path) -> list[Any]:
    """The YAML documents of ``path``; a syntax error names the file and line."""
    try:
        return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except OSError as e:
        raise ConfigError(f"cluster file {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"cluster file {path}{where}: invalid YAML ({e})") from None


def check_cluster_file(path: str | Path) -> dict[str, Any]:
    """Check a launcher YAML, KubeRay manifest or job runtime environment; return the launcher
    config (with Ray's defaults filled in), the RayJob/RayCluster document or the environment.

    Raises:
        ConfigError: naming the file and what is wrong.
    """
    path = Path(path)
    docs = read_yaml_documents(path)
    if not docs or not all(isinstance(d, dict) for d in docs):
        raise ConfigError(f"cluster file {path}: expected a YAML mapping")
    kube = [d for d in docs if d.get("kind") in KUBERAY_KINDS]
    if kube or any("apiVersion" in d for d in docs):
        if not kube:
            raise ConfigError(f"cluster file {path}: no RayJob or RayCluster document")
        spec = kube[0].get("spec") or {}
        cluster = spec.get("rayClusterSpec", spec) if kube[0]["kind"] == "RayJob" else spec
        if not isinstance(cluster, dict) or "headGroupSpec" not in cluster:
            raise ConfigError(f"cluster file {path}: {kube[0]['kind']} has no headGroupSpec")
        return kube[0]
    if not any(field in docs[0] for field in LAUNCHER_FIELDS):
        return check_runtime_env(path, docs[0])
    from jsonschema.exceptions import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        config = prepare_config(docs[0])
        validate_config(config)
    except ValidationError as e:
        field = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"cluster file {path}: {field}: {e.message}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cluster file {path}: {e}") from None
    return config


def check_runtime_env(path: Path, env: dict[str, Any]) -> dict[str, Any]:
    """Check a runtime environment for ``ray job submit --runtime-env``: Ray's fields only
    (``working_dir``, ``excludes``, ``pip``, ``env_vars``...), each of the type Ray expects."""
    from ray.runtime_env import RuntimeEnv

    public = sorted(f for f in RuntimeEnv.known_fields if not f.startswith("_"))
    for field in env:
        if field not in RuntimeEnv.known_fields:
            raise ConfigError(
                f"runtime environment {path}: unknown field {field!r}; Ray's fields: "
                f"{', '.join(public)}"
            )
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"runtime environment {path}: {e}") from None
    return env


def main(argv: list[str] | None = None) -> int:
    """Check each file; print one line per file."""
    p = argparse.ArgumentParser(prog="python -m distrl.clusters", description=__doc__)
    p.add_argument("files", nargs="+", type=Path, help="clusters/*.yaml files")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    for path in args.files:
        check_cluster_file(path)
        print(f"{path}: ok")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
