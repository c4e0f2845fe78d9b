"""The `pdpush` entry point: every command and benchmark is reachable and named in --help, old
spellings still parse (without being shown), bad usage exits 2 and a failed run 1 with the message
on stderr, and library log lines stay quiet unless -v."""

import logging
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pdpush.cli import ALIASES, BENCHES, COMMANDS, build_parser, expand_aliases, main
from pdpush.local.cluster import free_port
from pdpush.log import setup_logging

REPO = Path(__file__).resolve().parents[2]


def parse(*argv: str):
    argv = expand_aliases(list(argv))
    return build_parser(argv).parse_args(argv)


def imported_after(argv: list[str], modules: tuple[str, ...]) -> list[str]:
    """The `modules` that building the parser for `argv` imports (in a fresh interpreter)."""
    code = (f"import sys; from pdpush.cli import build_parser; build_parser({argv!r}); "
            f"print([m for m in {modules!r} if m in sys.modules])")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return eval(proc.stdout)


def test_top_level_help_imports_no_command_module():
    heavy = ("vllm", "torch", "nixl", "httpx", "pyroute2", "pdpush.rdma", "pdpush.bench", "pdpush.local")
    assert imported_after([], heavy) == []


def test_a_benchmark_imports_only_its_own_module():
    others = ("pdpush.bench.gpu", "pdpush.bench.serving", "pdpush.bench.interference", "torch", "vllm")
    assert imported_after(["bench", "rdma"], others) == []


def test_top_level_help_names_every_command_and_benchmark(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in [*COMMANDS, "bench"]:
        assert re.search(rf"^\s+{name}\s", out, re.M), name
    listed = out[out.index("benchmarks (pdpush bench NAME)") :]
    for name, (_, help_text) in BENCHES.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(help_text)}$", listed, re.M), name
    for alias in ALIASES:
        assert alias not in out


@pytest.mark.parametrize("argv", [[name] for name in COMMANDS] + [["bench", name] for name in BENCHES])
def test_each_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: pdpush " + " ".join(argv) in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# ---- old spellings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bench-rdma", "--samples", "3"], {"bench": "rdma", "samples": 3}),
        (["-q", "bench-gpu", "--reps", "2"], {"bench": "gpu", "repeats": 2, "quiet": True}),
        (["bench", "interference", "--decode-url", "http://d:1", "--prompt-len", "9"],
         {"d_url": "http://d:1", "prompt_tokens": 9}),
    ],
)  # fmt: skip
def test_old_spellings_land_on_the_new_names(argv, expected):
    args = vars(parse(*argv))
    assert {k: args[k] for k in expected} == expected


@pytest.mark.parametrize(("argv", "old"), [(["bench", "gpu"], "--reps"), (["bench", "interference"], "--decode-url"),
                                           (["bench", "interference"], "--prompt-len")])  # fmt: skip
def test_old_option_names_are_not_shown(argv, old, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    assert old not in capsys.readouterr().out


def recorded_commands() -> list[list[str]]:
    """Every pdpush command written in README.md and results/*/*/README.md (as a line of its own, or
    quoted in the text of a results README), and the suite runs of results/*/*/env.txt
    (scripts/gpu_suite.sh ARGS ran `pdpush bench-gpu --out DIR ARGS`)."""
    found = []
    for readme in [REPO / "README.md", *REPO.glob("results/*/*/README.md")]:
        text = readme.read_text()
        lines = re.findall(r"^(?:\.venv/bin/)?pdpush (.*)", text, re.M)
        quoted = re.findall(r"`pdpush ([^`]+)`", text) if readme.parent.parent.parent.name == "results" else []
        found += [shlex.split(command.split("#")[0]) for command in lines + quoted]
    for env in REPO.glob("results/*/*/env.txt"):
        for line in env.read_text().splitlines():
            if line.startswith("command: scripts/gpu_suite.sh"):
                found.append(["bench-gpu", "--out", "out/gpu", *shlex.split(line.split("gpu_suite.sh", 1)[1])])
    return found


def test_recorded_commands_are_found():
    assert any(c[:2] == ["bench", "interference"] for c in recorded_commands())
    assert any(c[0] == "bench-gpu" for c in recorded_commands())


@pytest.mark.parametrize("argv", recorded_commands(), ids=" ".join)
def test_recorded_commands_still_parse(argv):
    assert callable(parse(*argv)._run)


# ---- exit codes and stderr --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "serving", "--paths", "pdpush,teleport"], "pdpush bench serving: unknown --paths teleport"),
        (["bench", "gpu", "--device", "cpu", "--phases", "nap"], "pdpush bench gpu: unknown phase(s) ['nap']"),
        (["bench", "interference", "--batch", "0"], "pdpush bench interference: --batch must be >= 1"),
        (["demo", "--model", "/nonexistent-model"], "pdpush demo: /nonexistent-model is not a model folder"),
        (["bench", "wire", "--tokens", "2000,lots"], "pdpush bench wire: --tokens takes a comma list"),
    ],
)  # fmt: skip
def test_bad_usage_exits_2_with_one_line_on_stderr(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1].startswith(message), captured.err
    assert captured.out == ""


def test_argparse_usage_errors_also_exit_2_on_stderr(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "rdma", "--samples", "0"])
    assert exc.value.code == 2
    assert "--samples: expected an integer >= 1" in capsys.readouterr().err


def test_a_failed_run_exits_1_with_the_reason_on_stderr(capsys):
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the first request fails
    assert main(["demo", "--d-url", nobody]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1].startswith("pdpush demo: "), captured.err
    assert captured.out == ""


# ---- logging ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verbosity", "library_info", "pdpush_info", "pdpush_debug"),
    [(-1, False, False, False), (0, False, True, False), (1, True, True, True), (2, True, True, True)],
)
def test_library_logs_are_quiet_unless_verbose(verbosity, library_info, pdpush_info, pdpush_debug, monkeypatch):
    monkeypatch.delenv("PDPUSH_LOG", raising=False)
    root = logging.getLogger()
    before = root.level, logging.getLogger("pdpush").level
    try:
        setup_logging(verbosity)
        for library in ("httpx", "httpcore", "urllib3", "asyncio"):
            assert logging.getLogger(library).isEnabledFor(logging.INFO) == library_info
        assert logging.getLogger("pdpush.local.demo").isEnabledFor(logging.INFO) == pdpush_info
        assert logging.getLogger("pdpush.local.demo").isEnabledFor(logging.DEBUG) == pdpush_debug
    finally:
        root.setLevel(before[0])
        logging.getLogger("pdpush").setLevel(before[1])
