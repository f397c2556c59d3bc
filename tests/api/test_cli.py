"""The `tokenmill serve` command line: vLLM's flag names into EngineConfig and ServerConfig."""

from __future__ import annotations

import subprocess
import sys

import pytest

from api.cli import build_parser, engine_config, main, server_config
from api.lifecycle import bind_address
from model_runner.config import EngineConfig


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_defaults_are_engine_defaults():
    args = parse()
    assert engine_config(args) == EngineConfig()
    cfg = server_config(args)
    assert (cfg.host, cfg.port, cfg.api_key, cfg.max_logprobs) == ("127.0.0.1", 8000, None, 20)


def test_flags_reach_the_configs():
    args = parse("/models/x.gguf", "--host", "0.0.0.0", "--port", "9001",
                 "--max-model-len", "2048", "--max-num-seqs", "8",
                 "--max-num-batched-tokens", "512", "--block-size", "32", "--dtype", "half",
                 "--load-format", "gguf", "--kv-cache-memory", "0.25",
                 "--gpu-memory-utilization", "0.5", "--served-model-name", "smol",
                 "--seed", "7", "--max-logprobs", "5", "--api-key", "k",
                 "--enforce-eager", "--no-enable-prefix-caching", "--device", "cpu",
                 "--quantization", "int4")  # fmt: skip
    assert engine_config(args) == EngineConfig(
        model="/models/x.gguf", load_format="gguf", dtype="float16", device="cpu",
        quantization="int4",
        block_size=32, max_model_len=2048, max_num_seqs=8, max_num_batched_tokens=512,
        kv_cache_memory=0.25, gpu_memory_utilization=0.5, enable_prefix_caching=False,
        seed=7, max_logprobs=5, enforce_eager=True, served_model_name="smol",
    )  # fmt: skip
    cfg = server_config(args)
    assert (cfg.host, cfg.port, cfg.api_key, cfg.max_logprobs) == ("0.0.0.0", 9001, "k", 5)


def test_model_flag_and_positional():
    assert engine_config(parse("--model", "m.gguf")).model == "m.gguf"
    assert engine_config(parse("--enable-prefix-caching")).enable_prefix_caching is True
    with pytest.raises(SystemExit):
        engine_config(parse("a.gguf", "--model", "b.gguf"))
    with pytest.raises(SystemExit):
        parse("--dtype", "int3")


def test_quantization_choices_are_the_engine_s():
    from api.cli import QUANTIZATIONS
    from model_runner.linear_plan import QUANTIZATIONS as ENGINE_QUANTIZATIONS

    assert QUANTIZATIONS == ENGINE_QUANTIZATIONS
    assert engine_config(parse("-q", "gguf")).quantization == "gguf"


def test_start_up_errors_print_one_line_and_exit_2(tmp_path):
    bad = [
        ["--model", str(tmp_path / "missing.gguf")],
        ["--quantization", "gguf", "--load-format", "dummy", "--hf-config-path", str(tmp_path)],
    ]
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    for argv in bad:
        proc = subprocess.run(
            [sys.executable, "-m", "api", "serve", *argv], capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tokenmill: error: "), proc.stderr
    assert "needs a .gguf model" in lines[0]


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("TOKENMILL_API_KEY", "from-env")
    assert server_config(parse()).api_key == "from-env"


def test_bind_address():
    assert bind_address("127.0.0.1", 8000) == "127.0.0.1:8000"
    assert bind_address("::1", 8000) == "[::1]:8000"


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip()
    assert main([]) == 2


def test_python_dash_m_api():
    out = subprocess.run([sys.executable, "-m", "api", "serve", "--help"], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    for flag in ("--max-model-len", "--kv-cache-memory", "--no-enable-prefix-caching",
                 "--served-model-name", "--api-key"):  # fmt: skip
        assert flag in out.stdout


def test_tool_flags_reach_the_server_config(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0].content }}")
    args = parse("--enable-auto-tool-choice", "--tool-call-parser", "llama3_json",
                 "--exclude-tools-when-tool-choice-none", "--chat-template", str(template),
                 "--structured-outputs-timeout", "2.5")  # fmt: skip
    cfg = server_config(args)
    tools = cfg.tool_config
    assert (tools.enable_auto_tool_choice, tools.tool_call_parser) == (True, "llama3_json")
    assert tools.exclude_tools_when_tool_choice_none is True
    assert cfg.chat_template == "{{ messages[0].content }}"
    assert engine_config(args).structured_outputs_timeout == 2.5
    defaults = server_config(parse())
    assert defaults.tool_config.tool_call_parser is None and defaults.chat_template is None


def test_a_plugin_parser_resolves_by_name(tmp_path):
    plugin = tmp_path / "plugin_parser.py"
    plugin.write_text(
        "from api.tool_parsers import register_tool_parser\n"
        "from api.tool_parsers.llama3_json import Llama3JsonToolParser\n"
        "@register_tool_parser('cli_plugin')\n"
        "class Plugin(Llama3JsonToolParser):\n"
        "    pass\n"
    )
    args = parse("--tool-parser-plugin", str(plugin), "--tool-call-parser", "cli_plugin")
    assert server_config(args).tool_config.tool_call_parser == "cli_plugin"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--enable-auto-tool-choice"], "requires --tool-call-parser"),
        (["--tool-call-parser", "nope"], "unknown tool call parser"),
        (["--tool-parser-plugin", "/no/such/plugin.py"], "not a file"),
        (["--chat-template", "/no/such/template.jinja"], "--chat-template"),
    ],
)
def test_bad_tool_flags_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        server_config(parse(*argv))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_speculative_config_flag(capsys):
    cfg = engine_config(parse("--speculative-config",
                              '{"method": "ngram", "num_speculative_tokens": 5}'))  # fmt: skip
    assert cfg.speculative_config.num_speculative_tokens == 5
    assert cfg.speculative_config.prompt_lookup_max == 4
    assert engine_config(parse()).speculative_config is None
    draft = engine_config(parse("--speculative-config", '{"method": "draft_model", '
                                '"model": "small.gguf", "num_speculative_tokens": 2}'))  # fmt: skip
    assert (draft.speculative_config.method, draft.speculative_config.model) == (
        "draft_model", "small.gguf"
    )  # fmt: skip
    with pytest.raises(SystemExit):
        engine_config(
            parse("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 12}')
        )
    assert "num_speculative_tokens must be an integer 1..8" in capsys.readouterr().err


def test_spec_decode_metrics_are_exported():
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from actors.protocol import SchedulerStats, SpecDecodeStats
    from api.metrics import EngineStatsCollector

    stats = SchedulerStats(
        num_running=0, num_waiting=0, kv_cache_usage=0.0, num_blocks_in_use=0,
        prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0,
        spec=SpecDecodeStats(num_drafts=3, num_draft_tokens=9, num_accepted_tokens=5,
                             accepted_per_pos=[3, 2, 0]),
    )  # fmt: skip
    engine = SimpleNamespace(stats=stats, model_name="m", health=lambda: (True, ""),
                             actor_states=lambda: {})  # fmt: skip
    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(engine))
    text = generate_latest(registry).decode()
    assert 'tokenmill:spec_decode_num_draft_tokens_total{model_name="m"} 9.0' in text
    assert 'tokenmill:spec_decode_num_accepted_tokens_total{model_name="m"} 5.0' in text
    assert (
        'tokenmill:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="1"} 2.0'
        in text
    )


def test_kv_cache_dtype_choices_are_the_engine_s():
    from model_runner.kv_cache import KV_CACHE_DTYPES

    assert engine_config(parse()).kv_cache_dtype == "auto"
    for choice in KV_CACHE_DTYPES:
        assert engine_config(parse("--kv-cache-dtype", choice)).kv_cache_dtype == choice
    with pytest.raises(SystemExit):
        parse("--kv-cache-dtype", "int8")
