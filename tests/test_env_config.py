"""Configuration from the environment: every `serve` option from ALLMPNET_<OPTION>, flags over variables over
defaults, malformed variables as one-line errors (exit 2), and ALLMPNET_PRECISION as the one default precision
of the library, the CLI and the server."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from allmpnet.cli import build_parser, main
from allmpnet.errors import InvalidInput

ALLMPNET = [sys.executable, "-c", "import sys; from allmpnet.cli import main; sys.exit(main())"]

# one value per serve option that differs from its default (and keeps ServeConfig's checks happy)
SERVE_ENV = {
    "ALLMPNET_MODEL": "my-model-dir", "ALLMPNET_DEVICE": "cpu", "ALLMPNET_PRECISION": "bf16",
    "ALLMPNET_HOST": "0.0.0.0", "ALLMPNET_PORT": "9123", "ALLMPNET_API_KEY": "secret",
    "ALLMPNET_INDEX": "some-index", "ALLMPNET_SERVED_MODEL_NAME": "mpnet", "ALLMPNET_MAX_ITEMS": "64",
    "ALLMPNET_MAX_CHARS": "1000", "ALLMPNET_MAX_BODY_BYTES": "100000", "ALLMPNET_NO_TRUNCATE": "true",
    "ALLMPNET_ACCEPT_TOKEN_IDS": "yes", "ALLMPNET_MAX_BATCH_TOKENS": "2048", "ALLMPNET_MAX_BATCH_SIZE": "16",
    "ALLMPNET_MAX_QUEUE": "128", "ALLMPNET_NO_DYNAMIC_BATCHING": "1", "ALLMPNET_NO_WARM_UP": "on",
    "ALLMPNET_MAX_INFLIGHT_BYTES": "5000000", "ALLMPNET_MAX_HEADER_BYTES": "4096",
    "ALLMPNET_HEADER_TIMEOUT": "2.5", "ALLMPNET_BODY_TIMEOUT": "7", "ALLMPNET_READ_TIMEOUT": "3.5",
    "ALLMPNET_WRITE_TIMEOUT": "11", "ALLMPNET_THREADS": "3", "ALLMPNET_CALIBRATION": "ranges.npy",
    "ALLMPNET_LOG_LEVEL": "warning", "ALLMPNET_NO_ACCESS_LOG": "YES", "ALLMPNET_ADMISSION_TIMEOUT": "4",
    "ALLMPNET_KEEP_ALIVE_TIMEOUT": "9", "ALLMPNET_MAX_SEARCH_K": "50", "ALLMPNET_MAX_SEARCH_HITS": "500",
    "ALLMPNET_REPLICAS": "2", "ALLMPNET_ADDRESS": "ray://head:10001",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No ALLMPNET_* setting of the surrounding shell leaks into these tests (ALLMPNET_HOME, where weights and
    calibrations live, stays)."""
    for name in list(os.environ):
        if name.startswith("ALLMPNET_") and name != "ALLMPNET_HOME":
            monkeypatch.delenv(name)


def set_env(monkeypatch, values: dict[str, str]) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def serve_options() -> list[argparse.Action]:
    """Every option of `allmpnet serve` but -h and --debug."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in commands.choices["serve"]._actions if a.dest not in ("help", "debug")]


def test_every_serve_option_comes_from_the_environment(monkeypatch):
    from allmpnet.cli.serve import serve_config
    from allmpnet.serve.config import ServeConfig

    # the table above covers every option, so an option added later without a variable fails here
    assert sorted("ALLMPNET_" + a.dest.upper() for a in serve_options()) == sorted(SERVE_ENV)
    set_env(monkeypatch, SERVE_ENV)
    args = serve_args()
    assert (args.model, args.device, args.precision) == ("my-model-dir", "cpu", None)  # precision: the library's
    assert (args.host, args.port, args.index, args.threads) == ("0.0.0.0", 9123, Path("some-index"), 3)
    assert (args.log_level, args.no_access_log) == ("warning", True)
    assert (args.replicas, args.address) == (2, "ray://head:10001")
    assert serve_config(args) == ServeConfig(
        model_name="mpnet", api_key="secret", max_items=64, max_chars=1000, max_body_bytes=100_000,
        truncate=False, accept_token_ids=True, max_batch_tokens=2048, max_batch_size=16, max_queue=128,
        dynamic_batching=False, warm_up=False, max_inflight_bytes=5_000_000, max_header_bytes=4096,
        header_timeout=2.5, body_timeout=7.0, read_timeout=3.5, write_timeout=11.0, calibration="ranges.npy",
        admission_timeout=4.0, keep_alive_timeout=9.0, max_search_k=50, max_search_hits=500)


def test_without_the_environment_serve_keeps_its_defaults():
    from allmpnet.cli.serve import serve_config
    from allmpnet.serve.config import ServeConfig

    args = serve_args()
    assert (args.host, args.port, args.log_level, args.no_access_log, args.accept_token_ids) == (
        "127.0.0.1", 8000, "info", False, False)
    assert serve_config(args) == ServeConfig()


def test_flags_win_over_the_environment(monkeypatch, capsys):
    from allmpnet.cli.serve import serve_config

    set_env(monkeypatch, {"ALLMPNET_PORT": "9123", "ALLMPNET_HOST": "0.0.0.0", "ALLMPNET_MAX_ITEMS": "64",
                          "ALLMPNET_API_KEY": "from-env", "ALLMPNET_NO_TRUNCATE": "0",
                          "ALLMPNET_LOG_LEVEL": "debug", "ALLMPNET_HEADER_TIMEOUT": "2.5"})
    args = serve_args("--port", "9001", "--host", "127.0.0.2", "--api-key", "from-flag", "--no-truncate",
                      "--log-level", "error", "--accept-token-ids")
    assert (args.port, args.host, args.log_level) == (9001, "127.0.0.2", "error")
    config = serve_config(args)
    assert config.api_key == "from-flag" and config.truncate is False and config.accept_token_ids is True
    assert config.max_items == 64 and config.header_timeout == 2.5  # not given as flags: the environment's
    monkeypatch.setenv("ALLMPNET_NO_TRUNCATE", "1")
    assert serve_config(serve_args()).truncate is False
    monkeypatch.setenv("ALLMPNET_NO_TRUNCATE", "")  # empty: unset
    assert serve_config(serve_args()).truncate is True
    with pytest.raises(SystemExit) as exit_:  # a bad flag keeps argparse's message, whatever the variable holds
        serve_args("--port", "abc")
    assert exit_.value.code == 2
    assert "argument --port: invalid int value: 'abc'" in capsys.readouterr().err


@pytest.mark.parametrize("name, value, why", [
    ("ALLMPNET_PORT", "abc", "not an integer"),
    ("ALLMPNET_MAX_ITEMS", "1.5", "not an integer"),
    ("ALLMPNET_READ_TIMEOUT", "soon", "not a number"),
    ("ALLMPNET_NO_TRUNCATE", "maybe", "not a boolean"),
    ("ALLMPNET_ACCEPT_TOKEN_IDS", "sure", "not a boolean"),
    ("ALLMPNET_LOG_LEVEL", "loud", "choose from critical, error, warning, info, debug"),
])
def test_a_malformed_variable_is_one_line_naming_it(monkeypatch, capsys, name, value, why):
    monkeypatch.setenv(name, value)
    assert main(["serve", "--model", "never-loaded"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"allmpnet serve: error: ${name}={value!r}: {why}" + (
        ": use 1/true/yes/on or 0/false/no/off" if why == "not a boolean" else "")]


def test_a_malformed_variable_exits_2_without_a_traceback_and_spares_other_commands(monkeypatch, tiny_model_dir):
    env = {**os.environ, "ALLMPNET_PORT": "abc"}
    result = subprocess.run([*ALLMPNET, "serve"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "allmpnet serve: error: $ALLMPNET_PORT='abc': not an integer"
    # checked when `serve` parses, not when the parser is built: other commands do not care
    monkeypatch.setenv("ALLMPNET_PORT", "abc")
    assert main(["similarity", "a", "b", "--model", str(tiny_model_dir), "--device", "cpu"]) == 0


def test_help_names_each_variable(monkeypatch):
    monkeypatch.setenv("ALLMPNET_API_KEY", "do-not-print-me")
    monkeypatch.setenv("ALLMPNET_PORT", "9123")
    out = subprocess.run([*ALLMPNET, "serve", "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ}).stdout
    flat = " ".join(out.split())  # argparse wraps the help at the terminal's width
    for name in SERVE_ENV:
        assert f"[env: {name}]" in flat
    assert "do-not-print-me" not in out
    assert "default 8000 [env: ALLMPNET_PORT]" in flat  # the built-in default, not the variable's value
    for command in (["info"], ["encode"], ["similarity"], ["index", "build"], ["embed-corpus"]):
        out = subprocess.run([*ALLMPNET, *command, "--help"], capture_output=True, text=True, timeout=120).stdout
        assert "[env: ALLMPNET_PRECISION]" in " ".join(out.split()), command


def test_the_api_key_variable_is_the_servers_own(monkeypatch):
    from allmpnet.cli.environment import env_variable
    from allmpnet.serve.config import API_KEY_ENV

    assert env_variable(next(a for a in serve_options() if a.dest == "api_key")) == API_KEY_ENV
    from allmpnet.cli.serve import serve_config
    monkeypatch.setenv(API_KEY_ENV, "k")
    assert serve_config(serve_args()).api_key == "k"


# ---------------------------------------------------------------- ALLMPNET_PRECISION: one default precision


def test_precision_variable_sets_the_library_default(monkeypatch, tiny_model_dir):
    from allmpnet import Encoder
    from allmpnet.settings import default_precision

    assert default_precision() == "fp32"
    monkeypatch.setenv("ALLMPNET_PRECISION", "bf16")
    assert default_precision() == "bf16"
    assert Encoder(tiny_model_dir, device="cpu").plan.name == "bf16"
    assert Encoder(tiny_model_dir, device="cpu", precision="fp32").plan.name == "fp32"  # an argument wins


def test_info_and_serve_follow_the_precision_variable(monkeypatch, capsys, tiny_model_dir):
    from allmpnet.cli.core import load_encoder

    monkeypatch.setenv("ALLMPNET_PRECISION", "bf16")
    assert main(["info", "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["precision"].startswith("bf16 (as requested)")
    assert lines["precision_from"].strip() == "$ALLMPNET_PRECISION"
    assert main(["info", "--model", str(tiny_model_dir), "--device", "cpu", "--precision", "fp32"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["precision"].startswith("fp32") and lines["precision_from"].strip() == "--precision"
    assert load_encoder(serve_args("--model", str(tiny_model_dir), "--device", "cpu")).precision == "bf16"


def test_an_unknown_precision_variable_is_a_clear_error(monkeypatch, capsys, tiny_model_dir):
    from allmpnet import Encoder
    from allmpnet.settings import default_precision

    monkeypatch.setenv("ALLMPNET_PRECISION", "fp64")
    with pytest.raises(InvalidInput, match=r"\$ALLMPNET_PRECISION='fp64' is not a precision: use one of auto, "
                                           r"fp32, bf16, fp16, int8, bf16\+int8"):
        default_precision()
    with pytest.raises(InvalidInput, match="ALLMPNET_PRECISION"):
        Encoder(tiny_model_dir, device="cpu")
    assert main(["similarity", "a", "b", "--model", str(tiny_model_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("allmpnet similarity: error: $ALLMPNET_PRECISION='fp64'")
    # an explicit flag never reads the variable
    assert main(["similarity", "a", "b", "--model", str(tiny_model_dir), "--device", "cpu",
                 "--precision", "fp32"]) == 0


def reporting_factory(model, device, precision, max_seq_length):  # module level: spawned workers import it
    raise InvalidInput(f"this worker was asked for precision {precision}")


def test_other_entry_points_follow_the_precision_variable_but_training_does_not(monkeypatch, tiny_model_dir):
    from allmpnet.encode.pool import EncodePool, PoolWorkerError

    monkeypatch.setenv("ALLMPNET_PRECISION", "bf16")
    with pytest.raises(PoolWorkerError, match="asked for precision bf16"):
        EncodePool(str(tiny_model_dir), devices=["cpu"], factory=reporting_factory)
    monkeypatch.setenv("ALLMPNET_PRECISION", "fp64")
    with pytest.raises(InvalidInput, match="ALLMPNET_PRECISION"):  # before any worker starts
        EncodePool(str(tiny_model_dir), devices=["cpu"], factory=reporting_factory)
    monkeypatch.setenv("ALLMPNET_PRECISION", "bf16")
    # training's autocast precision is its own choice: not the serving default
    train = build_parser().parse_args(["train", "--data-config", "d.json", "--model", "m", "--out", "o",
                                       "--steps", "1"])
    assert train.precision == "auto"


def test_bulk_and_langchain_follow_the_precision_variable(monkeypatch, tiny_model_dir):
    pytest.importorskip("pyarrow")
    from allmpnet.bulk import BulkConfig

    monkeypatch.setenv("ALLMPNET_PRECISION", "bf16")
    assert BulkConfig().precision == "bf16"
    assert BulkConfig(precision="fp32").precision == "fp32"
    pytest.importorskip("langchain_core")
    from allmpnet.integrations.langchain import AllMpnetEmbeddings
    assert AllMpnetEmbeddings(tiny_model_dir, device="cpu").encoder.precision == "bf16"
