"""ServerArgs: the reference's flag names and defaults, checks with clear messages,
reference-only flags accepted with a warning, unknown flags refused."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from runtime.server_args import IGNORED_FLAGS, ServerArgs, make_parser, parse_server_args


def test_defaults_match_the_contract() -> None:
    args = parse_server_args(["--model-path", "/m"])
    assert args.host == "127.0.0.1"
    assert args.port == 30000
    assert args.page_size == 16
    assert args.schedule_policy == "fcfs"
    assert args.dtype == "auto"
    assert args.tokenizer_path == "/m"
    assert args.served_model_name == "/m"
    assert args.stream_interval == 1
    assert args.tp_size == 1 and args.dp_size == 1
    assert args.warmup is True  # on for the CLI
    assert args.enable_compile_cache is True
    assert isinstance(args.random_seed, int)
    assert args.max_running_requests is not None and args.max_running_requests >= 1
    assert args.chunked_prefill_size is not None and args.chunked_prefill_size >= args.page_size


def test_python_api_defaults_skip_warmup() -> None:
    assert ServerArgs(model_path="/m").warmup is False


def test_expert_parallel_flags_parse() -> None:
    for flag in ("--ep-size", "--expert-parallel-size", "--ep"):
        args = parse_server_args(f"--model-path /m --tp-size 2 {flag} 2".split())
        assert (args.tp_size, args.ep_size) == (2, 2)
    args = parse_server_args("--model-path /m --tp-size 4 --enable-ep-moe".split())
    assert (args.tp_size, args.ep_size) == (4, 4)


def test_the_backend_optimisation_level_reaches_the_compiler_options() -> None:
    assert ServerArgs(model_path="/m").compiler_options is None
    args = parse_server_args("--model-path /m --xla-backend-optimization-level 0".split())
    assert args.compiler_options == {"xla_backend_optimization_level": 0}


def test_reference_flags_parse() -> None:
    args = parse_server_args(
        "--model-path /m --tokenizer-path /t --host 0.0.0.0 --port 1234 --is-embedding "
        "--context-length 512 --mem-fraction-static 0.5 --max-running-requests 8 --max-total-tokens 4096 "
        "--chunked-prefill-size 256 --schedule-policy lpm --schedule-conservativeness 1.5 "
        "--disable-radix-cache --tp-size 1 --dp-size 1 "
        "--dtype half --random-seed 7 --page-size 32 --api-key k --served-model-name m "
        "--enable-metrics --log-level WARNING --stream-interval 4 --chat-template t.jinja --log-requests "
        "--allow-auto-truncate --load-format gguf --attention-backend reference --moe-backend pallas "
        "--no-warmup".split()
    )
    assert args.tokenizer_path == "/t"
    assert (args.host, args.port) == ("0.0.0.0", 1234)
    assert args.is_embedding and args.disable_radix_cache and args.enable_metrics and args.log_requests
    assert args.allow_auto_truncate
    assert args.context_length == 512 and args.mem_fraction_static == 0.5
    assert (args.max_running_requests, args.max_total_tokens, args.chunked_prefill_size) == (8, 4096, 256)
    assert (args.schedule_policy, args.tp_size, args.dtype, args.random_seed) == ("lpm", 1, "half", 7)
    assert args.schedule_conservativeness == 1.5
    assert (args.page_size, args.api_key, args.served_model_name) == (32, "k", "m")
    assert (args.log_level, args.stream_interval, args.chat_template) == ("warning", 4, "t.jinja")
    assert (args.load_format, args.attention_backend, args.moe_backend) == ("gguf", "reference", "pallas")
    assert args.warmup is False


def test_every_field_has_a_flag() -> None:
    parser = make_parser()
    dests = {action.dest for action in parser._actions}
    for field in dataclasses.fields(ServerArgs):
        assert field.name in dests, f"ServerArgs.{field.name} has no CLI flag"


def test_ignored_reference_flags_warn_once_each(caplog: pytest.LogCaptureFixture) -> None:
    argv = ["--model-path", "/m"]
    for flag in IGNORED_FLAGS:
        argv.append(flag.flag)
        if flag.takes_value:
            argv.append("1")
    with caplog.at_level(logging.WARNING, logger="runtime.server_args"):
        parse_server_args(argv)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(IGNORED_FLAGS)
    for flag, line in zip(IGNORED_FLAGS, lines, strict=True):
        assert line.startswith(f"{flag.flag} is ignored: ") and "\n" not in line


def test_cuda_attention_backend_becomes_auto(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="runtime.server_args"):
        args = parse_server_args(["--model-path", "/m", "--attention-backend", "flashinfer"])
    assert args.attention_backend == "auto"
    assert any("flashinfer" in r.getMessage() for r in caplog.records)


def test_unknown_flag_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_server_args(["--model-path", "/m", "--no-such-flag"])
    assert exc.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"page_size": 12}, "--page-size must be a power of two"),
        ({"port": 70000}, "--port must be in"),
        ({"mem_fraction_static": 1.5}, "--mem-fraction-static must be in (0, 1)"),
        ({"max_running_requests": 0}, "--max-running-requests must be at least 1"),
        ({"max_total_tokens": 8}, "--max-total-tokens (8) must hold at least one page"),
        ({"chunked_prefill_size": 4}, "--chunked-prefill-size must be -1"),
        ({"stream_interval": 0}, "--stream-interval must be at least 1"),
        ({"schedule_conservativeness": -0.5}, "--schedule-conservativeness must be a number of at least 0"),
        ({"schedule_conservativeness": float("nan")}, "--schedule-conservativeness must be a number"),
        ({"burst_window_ms": -1.0}, "--burst-window-ms must be in [0, 100], got -1.0."),
        ({"burst_window_ms": 500.0}, "--burst-window-ms must be in [0, 100]"),
        ({"tp_size": 0}, "--tp-size must be at least 1"),
        ({"ep_size": 0}, "--ep-size must be at least 1"),
        ({"tp_size": 4, "ep_size": 2}, "--ep-size 2 with --tp-size 4: expert parallelism spans"),
        ({"ep_size": 2}, "--ep-size 2 with --tp-size 1"),
        ({"schedule_policy": "lifo"}, "--schedule-policy must be one of fcfs, lpm"),
        (
            {"load_balance_method": "random"},
            "--load-balance-method must be one of round_robin, shortest_queue",
        ),
        ({"dtype": "int8"}, "--dtype must be one of"),
        ({"layer_loop": "auto"}, "--layer-loop must be one of scan, unrolled"),
        ({"fused_greedy_sampling": "yes"}, "--fused-greedy-sampling must be one of auto, on, off"),
        ({"dispatch_thread": "yes"}, "--dispatch-thread must be one of auto, on, off"),
        ({"xla_backend_optimization_level": 4}, "--xla-backend-optimization-level must be in [0, 3]"),
        ({"load_format": "pt"}, "--load-format must be one of"),
        ({"context_length": 1}, "--context-length must be at least 2"),
        ({"nnodes": 2, "tp_size": 2}, "--nnodes 2 needs --dist-init-addr host:port"),
        ({"nnodes": 2, "tp_size": 3, "dist_init_addr": "h:1"}, "--tp-size (3) must be a multiple of it"),
        ({"nnodes": 2, "tp_size": 2, "dp_size": 2, "dist_init_addr": "h:1"}, "--dp-size with --nnodes"),
        ({"node_rank": 1}, "--node-rank must be in"),
        ({"skip_tokenizer_init": True, "chat_template": "x"}, "--chat-template needs a tokenizer"),
    ],
)
def test_invalid_settings_raise_naming_the_flag(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        ServerArgs(model_path="/m", **kwargs)
    assert message in str(exc.value)


def test_cli_check_failure_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_server_args(["--model-path", "/m", "--page-size", "3"])
    assert "--page-size must be a power of two" in capsys.readouterr().err


def test_chunked_prefill_can_be_disabled() -> None:
    assert ServerArgs(model_path="/m", chunked_prefill_size=-1).chunked_prefill_size == -1


def test_server_info_dict_hides_the_api_key() -> None:
    info = ServerArgs(model_path="/m", api_key="secret").to_dict()
    assert info["api_key"] != "secret"
    assert ServerArgs(model_path="/m").to_dict()["api_key"] is None
    assert {f.name for f in dataclasses.fields(ServerArgs)} == set(info)
