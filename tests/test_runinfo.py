"""minidit.runinfo: the command and machine record every benchmark writes beside its figures."""

import json
import sys

import torch

from minidit.runinfo import command_line, machine, save_result


def test_command_line_uses_the_given_arguments_or_the_process_own(monkeypatch):
    cmd = command_line("python benchmarks/x.py", ["--quick", "--json", "o.json"])
    assert cmd == "python benchmarks/x.py --quick --json o.json"
    assert command_line("python benchmarks/x.py", []) == "python benchmarks/x.py"  # [] is no arguments, not sys.argv
    monkeypatch.setattr(sys, "argv", ["x.py", "--n", "5"])
    assert command_line("python -m minidit") == "python -m minidit --n 5"
    assert command_line("minidit", ["train", "--out", "my runs/a"]) == "minidit train --out 'my runs/a'"  # quoted


def test_machine_records_threads_and_device():
    info = machine("cpu")
    assert info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    assert info["device"] == "cpu" and info["cpu"] and info["platform"]
    assert "device" not in machine()
    json.dumps(info)  # serialisable as it stands


def test_save_result_writes_json_or_nothing(tmp_path, capsys):
    save_result(None, {"a": 1})
    assert capsys.readouterr().err == ""
    out = tmp_path / "sub" / "r.json"
    save_result(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1} and f"wrote {out}" in capsys.readouterr().err
