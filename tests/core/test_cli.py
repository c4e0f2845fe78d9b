"""The `pdpush` entry point: every subcommand is reachable, and --help pulls in no heavy import."""

import subprocess
import sys

import pytest

from pdpush.cli import COMMANDS, main


def test_top_level_help_imports_no_command_module():
    code = ("import sys; from pdpush.cli import build_parser; build_parser([]); "
            "heavy = [m for m in ('vllm', 'torch', 'nixl', 'httpx', 'pyroute2', 'pdpush.rdma') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert "usage: pdpush " + name in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
