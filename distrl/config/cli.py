"""Command-line parsing shared by distrl's entry points: ``--config`` plus one dotted flag per
config field (``--learner.lr 3e-5``), with each field's help text."""

from __future__ import annotations

import argparse
import difflib
import errno
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from distrl import config as cfg
from distrl.config.schema import to_dict
from distrl.errors import ConfigError, DistrlError


def chosen_config(argv: list[str]) -> tuple[str, cfg.RunConfig | None]:
    """The ``--config`` named in ``argv`` (``default`` when none) and its values, or None when
    it does not load (the error then comes from parsing, naming the problem)."""
    name = "default"
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--config="):
            name = arg.split("=", 1)[1]
    try:
        return name, cfg.load_config(name)
    except DistrlError:
        return name, None


def add_config_arguments(
    parser: argparse.ArgumentParser, shown: tuple[str, cfg.RunConfig | None] | None = None
) -> None:
    """Add ``--config`` and one ``--section.field`` flag per config field to ``parser``.

    Args:
        parser: the parser to extend.
        shown: ``(name, config)`` whose values the help shows as defaults (``chosen_config``);
            None or an unloadable config shows the built-in defaults.
    """
    parser.add_argument(
        "--config",
        default="default",
        metavar="NAME_OR_YAML",
        help=f"packaged config ({', '.join(cfg.NAMED_CONFIGS)}) or a YAML file "
        "(default: %(default)s)",
    )
    name, config = shown or ("", None)
    where = (
        f"the values shown are those of --config {name}"
        if config is not None
        else "the values shown are the built-in defaults, which a config file may change"
    )
    group = parser.add_argument_group("config fields", f"override the --config file; {where}")
    defaults = to_dict(config if config is not None else cfg.RunConfig())
    for path, tp, f in cfg.iter_fields():
        default: Any = defaults
        for part in path.split("."):
            default = default[part]
        checks = ", ".join(
            f"{k} {v}" for k, v in f.metadata.items() if k in ("ge", "gt", "le", "lt")
        )
        extra = f"; {checks}" if checks else ""
        group.add_argument(
            f"--{path}",
            dest=f"cfg:{path}",
            default=None,
            metavar=_metavar(tp),
            help=f"{f.metadata.get('help', '')} (default: {default!r}{extra})".replace("%", "%%"),
        )


def _metavar(tp: Any) -> str:
    """A short metavar: {ppo,dqn}, FLOAT, INT|null, YAML_LIST, YAML_MAP."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        return "|".join("null" if a is type(None) else _metavar(a) for a in args)
    if origin is tuple:
        return "YAML_LIST"
    if origin is dict:
        return "YAML_MAP"
    return {bool: "true|false"}.get(tp, getattr(tp, "__name__", str(tp)).upper())


def parse_config(
    parser: argparse.ArgumentParser, argv: list[str] | None, aliases: dict[str, str] | None = None
) -> tuple[argparse.Namespace, cfg.RunConfig]:
    """Parse ``argv`` and return the namespace and the validated ``RunConfig``.

    Unknown flags and bad values raise ConfigError naming the flag and its closest spelling.

    Args:
        parser: a parser set up with ``add_config_arguments``.
        argv: command-line arguments (``sys.argv[1:]`` when None).
        aliases: namespace attribute -> dotted config field for convenience flags
            (``output_dir`` -> ``output.dir``).
    """
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        close = difflib.get_close_matches(flag.split("=")[0], options, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown option {flag}{hint}; see --help")
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    for attr, path in (aliases or {}).items():
        if getattr(args, attr, None) is not None:
            overrides[path] = getattr(args, attr)
    return args, cfg.load_config(args.config, overrides)


# A write that failed for a reason outside distrl: a full disk or quota, a read-only or
# forbidden folder.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_main(main: Callable[[], int]) -> None:
    """Run a CLI ``main``; a DistrlError is printed as one line and exits with status 2 (a run
    stopped by a signal: 128 + its number)."""
    try:
        code = main()
    except DistrlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = getattr(exc, "exit_code", 2)
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        what = f"cannot write {exc.filename}" if exc.filename else "a write failed"
        print(
            f"error: {what}: {exc.strerror} ({errno.errorcode[exc.errno]}); "
            "free space or fix the permission, then run it again",
            file=sys.stderr,
        )
        code = 2
    except (KeyboardInterrupt, SystemError) as exc:
        # A second Ctrl-C raises from the signal handler, which may land in Ray's C code and
        # arrive wrapped in a SystemError; any other SystemError is a bug and keeps its trace.
        if isinstance(exc, SystemError) and not isinstance(exc.__cause__, KeyboardInterrupt):
            raise
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
