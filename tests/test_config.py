import argparse
import dataclasses

import pytest
import yaml

from distrl.config import (
    NAMED_CONFIGS,
    RunConfig,
    cli,
    dump_yaml,
    iter_fields,
    load_config,
)
from distrl.config.schema import to_dict
from distrl.errors import ConfigError


def parse(argv):
    parser = argparse.ArgumentParser()
    cli.add_config_arguments(parser)
    parser.add_argument("--output-dir", dest="output_dir")
    return cli.parse_config(parser, argv, aliases={"output_dir": "output.dir"})


@pytest.mark.parametrize("name", NAMED_CONFIGS)
def test_packaged_configs_load(name):
    config = load_config(name)
    assert isinstance(config, RunConfig)
    assert dataclasses.is_dataclass(config.learner)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.learner.lr = 1.0


def test_yaml_round_trip(tmp_path):
    config = load_config("tiny", {"learner.lr": "3e-5", "reward.components": "[{name: length}]"})
    dump_yaml(config, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == config
    assert again.learner.lr == 3e-5
    assert again.reward.components[0].name == "length"


def test_cli_overrides_and_aliases():
    _, config = parse(
        [
            "--config",
            "tiny",
            "--learner.lr",
            "3e-5",
            "--rollout.num_workers",
            "3",
            "--ppo.kl_target",
            "0.1",
            "--output-dir",
            "somewhere",
            "--tokenizer.chat_template",
            "false",
        ]
    )
    assert config.learner.lr == pytest.approx(3e-5)
    assert config.rollout.num_workers == 3
    assert config.ppo.kl_target == pytest.approx(0.1)
    assert config.output.dir == "somewhere"
    assert config.tokenizer.chat_template is False


def test_empty_value_means_none():
    _, config = parse(["--config", "tiny", "--ppo.kl_target", "null"])
    assert config.ppo.kl_target is None


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--learner.lrr", "1"], "--learner.lr"),
        (["--learner.lr", "-1"], "learner.lr: -1.0 is out of range (allowed: > 0.0"),
        (["--learner.lr", "fast"], "learner.lr: expected a number, got str 'fast'"),
        (["--rollout.num_workers", "2.5"], "rollout.num_workers: expected an integer"),
        (["--rollout.top_p", "1.5"], "rollout.top_p: 1.5 is out of range"),
        (
            ["--algo", "sac"],
            "algo: 'sac' is not one of 'ppo' | 'grpo' | 'dr_grpo' | 'rloo' | 'reinforce_pp' "
            "| 'gspo' | 'cispo' | 'dqn'",
        ),
        (["--output.tensorboard", "maybe"], "output.tensorboard: expected true or false"),
        (
            ["--reward.components", "[{name: x, wieght: 1}]"],
            "reward.components[0].wieght' (did you mean 'reward.components[0].weight'",
        ),
        (["--ppo.minibatch_size", "1000"], "ppo.minibatch_size (1000) is larger"),
        (["--learner.lr", "nan"], "learner.lr: nan is not a finite number"),
    ],
)
def test_cli_errors_name_the_field(argv, fragment):
    with pytest.raises(ConfigError) as info:
        parse(["--config", "tiny", *argv])
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("learner:\n  lrr: 0.1\n", "unknown config key 'learner.lrr' (did you mean 'learner.lr'?)"),
        ("lerner:\n  lr: 0.1\n", "did you mean 'learner'"),
        ("learner:\n  lr: -0.1\n", "learner.lr: -0.1 is out of range"),
        ("learner: 3\n", "learner: expected a mapping"),
        ("rollout:\n  batch_size: '8'\n", "rollout.batch_size: expected an integer, got str"),
        ("seed: 1\nlearner: [1, 2\n", "invalid YAML"),
        ("- a\n- b\n", "expected a mapping of config sections"),
        ("reward:\n  components: {name: x}\n", "reward.components: expected a list"),
    ],
)
def test_yaml_errors_name_the_field(tmp_path, text, fragment):
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(file))
    assert fragment in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="neither a packaged config"):
        load_config("no/such/file.yaml")


def test_every_field_has_help_and_a_flag():
    parser = argparse.ArgumentParser()
    cli.add_config_arguments(parser)
    text = parser.format_help()
    for path, _, f in iter_fields():
        assert f.metadata.get("help"), path
        assert f"--{path}" in text


def field_help(text: str, flag: str) -> str:
    """The help paragraph of ``flag`` in ``--help`` output, on one line."""
    start = text.index(f"  {flag} ")
    end = text.find("\n  --", start + 1)
    return " ".join(text[start:end].split())


@pytest.mark.parametrize(
    "argv, iterations, lr",
    [([], "30", "3e-05"), (["--config", "tiny"], "4", "0.001"), (["--config=tiny"], "4", "0.001")],
)
def test_help_shows_the_chosen_configs_values(argv, iterations, lr):
    from distrl.run import parser

    text = parser(argv).format_help()
    assert "(default: " + iterations + ";" in field_help(text, "--iterations")
    assert "(default: " + lr + ";" in field_help(text, "--learner.lr")
    name = "tiny" if argv else "default"
    assert f"the values shown are those of --config {name}" in " ".join(text.split())


def test_help_falls_back_to_built_in_defaults_for_a_config_that_does_not_load():
    from distrl.run import parser

    text = parser(["--config", "no/such.yaml"]).format_help()
    assert "(default: 100;" in field_help(text, "--iterations")  # RunConfig's own


def test_to_dict_is_yaml_ready():
    text = yaml.safe_dump(to_dict(load_config("default")))
    assert "components" in text and "!!python" not in text


def test_a_config_file_starts_from_its_base(tmp_path):
    mine = "base: tiny\niterations: 7\nlearner: {lr: 0.002}\nrollout: {batch_size: 2}\n"
    (tmp_path / "mine.yaml").write_text(mine)
    config = load_config(str(tmp_path / "mine.yaml"))
    tiny = load_config("tiny")
    assert config.iterations == 7 and config.learner.lr == 0.002
    # Everything else is the base's, nested sections merged field by field: tiny's rollout
    # fields that differ from the defaults stay beside the one this file sets.
    assert config.rollout.batch_size == 2 and config.rollout.num_workers == 2
    assert config.rollout.max_new_tokens == tiny.rollout.max_new_tokens == 8
    assert config.learner.max_grad_norm == tiny.learner.max_grad_norm
    assert config.model == tiny.model
    # A base named by a relative path is found beside the file naming it, and chains.
    (tmp_path / "more.yaml").write_text("base: mine.yaml\nseed: 3\n")
    chained = load_config(str(tmp_path / "more.yaml"))
    assert (chained.seed, chained.iterations, chained.model) == (3, 7, tiny.model)


def test_a_base_that_goes_round_in_a_circle_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="'base' goes round in a circle"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: [tiny]\n")
    with pytest.raises(ConfigError, match="base must be a packaged config name or a file"):
        load_config(str(tmp_path / "c.yaml"))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"ppo.minibatch_size": 1000}, "ppo.minibatch_size (1000) is larger than a rollout batch"),
        (
            {"algo": "grpo", "rollout.samples_per_prompt": 1},
            "algo grpo compares the completions of one prompt: set rollout.samples_per_prompt "
            "to 2 or more (now 1)",
        ),
        (
            {"ppo.dynamic_sampling": True, "rollout.samples_per_prompt": 1},
            "ppo.dynamic_sampling compares the completions of one prompt",
        ),
        (
            {"algo": "dqn", "rollout.samples_per_prompt": 2},
            "rollout.samples_per_prompt must be 1 with algo dqn",
        ),
        (
            {"ppo.overlong_buffer": 8},
            "ppo.overlong_buffer (8) must be below rollout.max_new_tokens",
        ),
        (
            {"rollout.mode": "async", "rollout.max_policy_lag": 0},
            "rollout.mode async queues batches ahead of the learner: set "
            "rollout.max_policy_lag to 1 or more",
        ),
        (
            {"rollout.mode": "async", "rollout.weight_sync": "broadcast"},
            "a broadcast needs every worker at once: use rollout.weight_sync object_store",
        ),
        (
            {"replay.beta_start": 0.8, "replay.beta_end": 0.5},
            "replay.beta_end must be >= replay.beta_start",
        ),
        (
            {"algo": "dqn", "rollout.engine": "vllm"},
            "it needs dqn.q_network lm_head, dqn.exploration boltzmann and dqn.action_top_k 0 "
            "(now lm_head, epsilon, 32)",
        ),
        (
            {"rollout.engine": "vllm", "learner.lora.rank": 4},
            "rollout.engine vllm takes full weights",
        ),
        (
            {"algo": "dqn", "learner.lora.rank": 4, "dqn.q_network": "performer"},
            "dqn.q_network performer is a network of its own",
        ),
        (
            {"dqn.q_network": "lm_head", "dqn.prune_sparsity": 0.5},
            "apply to dqn.q_network=mlp only, not 'lm_head'",
        ),
        (
            {"algo": "dqn", "dqn.q_network": "mlp", "resources.learner_workers": 2},
            "dqn.q_network mlp runs on one learner worker",
        ),
        (
            {"ppo.ce_coef": 0.1, "resources.learner_workers": 2},
            "ppo.ce_coef > 0 runs on one learner worker",
        ),
        ({"reward.components": []}, "reward.components: give at least one reward component"),
        (
            {"env.name": "guess", "ppo.overlong_buffer": 4},
            "ppo.overlong_buffer shapes single completions",
        ),
    ],
)
def test_every_cross_field_rule_refuses_with_its_reason(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    assert fragment in str(info.value)


def test_the_cross_field_rules_accept_their_valid_neighbours():
    load_config("tiny", {"algo": "grpo"})  # the group size comes from the algorithm
    load_config("tiny", {"ppo.dynamic_sampling": True})  # ... and for dynamic sampling
    load_config("tiny", {"ppo.overlong_buffer": 7})
    load_config("tiny", {"replay.beta_start": 0.5, "replay.beta_end": 0.5})
    vllm_dqn = {"dqn.exploration": "boltzmann", "dqn.action_top_k": 0}
    load_config("tiny", {"algo": "dqn", "rollout.engine": "vllm", **vllm_dqn})
    load_config("tiny", {"algo": "dqn", "learner.lora.rank": 4})
    load_config("tiny", {"learner.lora.rank": 4, "resources.learner_workers": 2})
    load_config("tiny", {"algo": "dqn", "resources.learner_workers": 2})
    load_config("tiny", {"algo": "dqn", "learner.lora.rank": 4, "resources.learner_workers": 2})
    load_config("tiny", {"env.name": "guess", "reward.components": []})
    load_config("tiny", {"algo": "dqn", "env.name": "guess"})


def test_a_full_disk_or_a_forbidden_folder_is_one_line_in_every_entry_point(monkeypatch, capsys):
    """``cli.run_main`` runs every application's main: a write the machine refuses is one line,
    status 2; any other OSError is a bug and keeps its traceback."""
    import errno

    from distrl.config import cli

    def writes_to_a_full_disk():
        with open("/dev/full", "wb") as full:
            full.write(b"\0" * 4096)
            full.flush()
        return 0

    with pytest.raises(SystemExit) as stopped:
        cli.run_main(writes_to_a_full_disk)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        "error: a write failed: No space left on device (ENOSPC); free space or fix the "
        "permission, then run it again\n"
    )

    def forbidden():
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/runs/out.json")

    with pytest.raises(SystemExit):
        cli.run_main(forbidden)
    assert capsys.readouterr().err.startswith(
        "error: cannot write /srv/runs/out.json: Permission denied (EACCES); "
    )

    def a_bug():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    with pytest.raises(FileNotFoundError):
        cli.run_main(a_bug)
