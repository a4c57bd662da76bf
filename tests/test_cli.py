import subprocess
import sys

import pytest

from prunekit.cli import main


def test_help_and_version(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0


def test_demo_help_runs_as_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "prunekit.cli", "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--sparsity" in out.stdout
