import pytest

from launcher.cli import main
from core.config import RunConfig, load_config
from core.errors import UserError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]
PRESET = "launcher/configs/ncf_ml100k.toml"


def test_preset_loads_with_model_params():
    config = load_config(PRESET)
    assert config.model.name == "ncf"
    assert config.model.resolved_params().mlp_dims == [64, 32, 16]
    assert config.sharding.tables["gmf_user"] == "row_wise"


def test_overrides_are_typed_and_win_over_the_file():
    config = load_config(
        PRESET,
        [("trainer.epochs", "3"), ("trainer.sparse_lr", "1"), ("model.mlp_dims", "[32, 16]"),
         ("sharding.tables.gmf_item", "column_wise"), ("cluster.address", "auto")],
    )
    assert config.trainer.epochs == 3
    assert config.trainer.sparse_lr == 1.0 and isinstance(config.trainer.sparse_lr, float)
    assert config.model.resolved_params().mlp_dims == [32, 16]
    assert config.sharding.tables == {"gmf_user": "row_wise", "mlp_user": "row_wise", "gmf_item": "column_wise"}
    assert config.cluster.address == "auto"


def test_json_round_trip():
    config = load_config(PRESET, [("model.gmf_dim", "8")])
    again = RunConfig.from_dict(__import__("json").loads(config.to_json())).validate()
    assert again == config


@pytest.mark.parametrize(
    "override, message",
    [
        (("trainer.epoch", "3"), "unknown key trainer.epoch"),
        (("trainer.epochs", "three"), "trainer.epochs must be int"),
        (("trainer.epochs", "0"), "trainer.epochs must be >= 1"),
        (("model.name", "nope"), "unknown model 'nope'"),
        (("model.gmf_size", "3"), "unknown key model.gmf_size"),
        (("model.mlp_dims", "[63, 8]"), "must be even"),
        (("sharding.tables.gmf_user", "diagonal"), "unknown sharding type 'diagonal'"),
        (("optimizer.lr", "1"), "unknown config section 'optimizer'"),
        (("eval.history", "sometimes"), "eval.history must be auto, masked or kept"),
        (("eval.protocol", "all"), "eval.protocol must be"),
    ],
)
def test_bad_config_values_are_rejected_with_a_reason(override, message):
    with pytest.raises(UserError, match=message):
        load_config(PRESET, [override])


def test_bad_toml_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[trainer]\nepochs = = 3\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[trainer]\nlearning_rate = 0.1\n")
    with pytest.raises(UserError, match="unknown key trainer.learning_rate"):
        load_config(unknown)


def test_cli_reports_config_errors_in_one_line_with_exit_code_2(capsys):
    assert main(["train", "--config", PRESET, "--model.name", "transformer9000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shardrec: error: unknown model 'transformer9000'")
    assert "Traceback" not in err
    assert main(["train", "--config", "missing.toml"]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", "--config", PRESET, "--trainer.epochs"]) == 2
    assert "needs a value" in capsys.readouterr().err


def test_cli_config_command_prints_resolved_config(capsys):
    assert main(["config", "--config", PRESET, "--trainer.epochs", "7"]) == 0
    assert '"epochs": 7' in capsys.readouterr().out


def test_sequence_models_refuse_a_random_split_before_starting_anything(ml100k_small, capsys):
    assert main(["train", "--config", "launcher/configs/sasrec_ml100k.toml", "--data.path", str(ml100k_small)]) == 2
    err = capsys.readouterr().err
    assert "sequence models need a leave-one-out split" in err and "--split loo" in err
    assert main(["train", "--config", "launcher/configs/gru4rec_ml100k.toml", "--model.max_len", "1"]) == 2
    assert "model.max_len must be >= 2" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[("cluster.launcher", "torchrun")], [("model.name", "sasrec")]])
def test_a_shuffle_buffer_that_a_path_would_ignore_is_refused(extra):
    overrides = [("data.shuffle_buffer", "5000"), *extra]
    with pytest.raises(UserError, match="data.shuffle_buffer"):
        load_config(None, overrides).validate()
    load_config(None, [("data.shuffle_buffer", "5000")]).validate()  # the Ray stream uses it
    load_config(None, extra).validate()  # the default is accepted everywhere
