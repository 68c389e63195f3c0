"""The `minidit` command: every subcommand exists, the train → sample → evaluate route works (resume included, after a
kill -9 too), and every expected error is one line `minidit CMD: error: …` with exit status 2 and no traceback."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from minidit.checkpoint import read_meta, weights_path
from minidit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--recipe", "tiny", "--batch-size", "16", "--device", "cpu", "--time-budget", "0"]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def fails_cleanly(capsys, argv, match, command=None, before=0):
    """main(argv) exits 2 with ONE stderr line `minidit CMD: error: …` containing `match` (after `before` lines of
    progress information), and no traceback."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's errors exit from inside parse_args
        code = e.code
    out = capsys.readouterr()
    prog = " ".join(["minidit", *([argv[0]] if command is None else [command] if command else [])])
    lines = out.err.strip().splitlines()
    assert code == 2, (code, out.err)
    assert len(lines) == 1 + before and lines[-1].startswith(f"{prog}: error: "), out.err
    assert match in lines[-1] and "Traceback" not in out.err, out.err
    return lines[-1]


def python_m_minidit(*argv, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "minidit", *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


SUBCOMMANDS = ["demo", "train", "sample", "evaluate", "classifier", "vae", "t2i", "notebooks", "grade", "exercises",
               "autograder"]


@pytest.mark.parametrize("cmd", [[], *([c] for c in SUBCOMMANDS)])
def test_help(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: minidit {cmd[0] if cmd else ''}".rstrip())
    if not cmd:  # the top-level help lists every subcommand
        assert all(c in out for c in SUBCOMMANDS)


def test_grading_commands_parse():
    p = build_parser()
    args = p.parse_args(["grade", "nb.ipynb", "--timeout", "7", "--json", "r.json"])
    assert args.timeout == 7.0 and args.json_path == "r.json" and args.notebook == "nb.ipynb"
    assert p.parse_args(["exercises", "--check"]).check is True
    assert p.parse_args(["autograder", "A1"]).assignment == "A1"
    vae = p.parse_args(["vae", "evaluate", "vae_mnist_f4c4"])
    assert (vae.action, vae.checkpoint) == ("evaluate", "vae_mnist_f4c4")
    assert p.parse_args(["train", "--out", "o", "--objective", "ddpm"]).objective == "ddpm"


def test_train_resume_sample_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", *TINY, "--steps", "4", "--out", str(out))
    assert code == 0 and "trained 4 steps" in stdout
    assert {"train_state.safetensors", "train_state.json", "model.safetensors", "model.json", "loss.png"} <= {
        p.name for p in out.iterdir()}
    code, stdout, err = run(capsys, "train", *TINY, "--steps", "6", "--out", str(out), "--resume")
    assert code == 0 and "resumed from step 4" in err and "trained 6 steps" in stdout
    meta = json.loads((out / "model.json").read_text())
    assert meta["command"] == f"minidit train {' '.join(TINY)} --steps 6 --out {out} --resume"
    assert meta["machine"]["device"] == "cpu" and meta["train_seconds"] > 0 and meta["step"] == 6

    npz = tmp_path / "s.npz"
    code, stdout, _ = run(capsys, "sample", "--checkpoint", str(out / "model.safetensors"), "--n", "12",
                          "--steps", "2", "--out", str(npz), "--grid", str(tmp_path / "g.png"))
    assert code == 0
    z = np.load(npz)
    assert z["images"].shape == (12, 28, 28, 1) and z["images"].dtype == np.uint8
    assert z["labels"].tolist() == [i % 10 for i in range(12)]
    assert (tmp_path / "g.png").exists()
    code, _, _ = run(capsys, "sample", "--checkpoint", str(out / "model.safetensors"), "--n", "4", "--steps", "1",
                     "--labels", "1,7", "--out", str(npz))
    assert code == 0 and np.load(npz)["labels"].tolist() == [1, 7, 1, 7]

    code, stdout, _ = run(capsys, "evaluate", str(npz), "--json", str(tmp_path / "m.json"))
    assert code == 0 and 0 <= json.loads((tmp_path / "m.json").read_text())["conditional_accuracy"] <= 1


def test_ddpm_training_then_sampling_uses_its_schedule(tmp_path, capsys):
    out = tmp_path / "ddpm"
    assert run(capsys, "train", *TINY, "--steps", "2", "--objective", "ddpm", "--out", str(out))[0] == 0
    assert read_meta(out / "model.safetensors")["train"]["objective"] == "ddpm"
    npz = tmp_path / "s.npz"
    code, _, err = run(capsys, "sample", "--checkpoint", str(out / "model.safetensors"), "--n", "3", "--steps", "2",
                       "--sampler", "ddim", "--out", str(npz))
    assert code == 0 and "'schedule'" in err and "'clip_x0': True" in err  # pixel space: x0 is clipped
    assert np.load(npz)["images"].shape == (3, 28, 28, 1)


def test_demo_writes_metrics(tmp_path, capsys):
    code, stdout, _ = run(capsys, "demo", "--recipe", "tiny", "--steps", "3", "--n", "20", "--out", str(tmp_path))
    assert code == 0 and "conditional accuracy" in stdout
    m = json.loads((tmp_path / "metrics.json").read_text())
    for k in ("conditional_accuracy", "fid", "fid_floor", "fid_ratio", "train_seconds", "steps", "parameters"):
        assert k in m
    assert m["steps"] == 3 and (tmp_path / "samples.png").exists() and (tmp_path / "loss.png").exists()
    assert m["machine"]["device"] == "cpu" and m["machine"]["threads"] >= 1  # where the figures were measured
    assert m["command"] == f"minidit demo --recipe tiny --steps 3 --n 20 --out {tmp_path}"
    assert json.loads((tmp_path / "model.json").read_text())["command"] == m["command"]


def test_classifier_records_the_command_that_made_it(tmp_path, capsys):
    out = tmp_path / "clf.safetensors"
    code, stdout, _ = run(capsys, "classifier", "--epochs", "1", "--out", str(out))
    meta = read_meta(out)
    assert code == 0 and "held-out accuracy" in stdout
    assert meta["command"] == f"minidit classifier --epochs 1 --out {out}" and meta["epochs"] == 1
    assert meta["kind"] == "classifier" and 0 < meta["held_out_accuracy"] <= 1


def test_vae_evaluate_a_shipped_vae(capsys):
    code, stdout, _ = run(capsys, "vae", "evaluate", "vae_mnist_f4c4")
    assert code == 0
    psnr = float(stdout.split("psnr ")[1].split(",")[0])
    assert psnr == pytest.approx(read_meta(weights_path("vae_mnist_f4c4"))["held_out"]["psnr"], abs=0.05)


def test_latent_demo_then_sample_decodes_with_the_recorded_vae(tmp_path, capsys):
    out = tmp_path / "demo"
    code, _, err = run(capsys, "demo", "--recipe", "latent", "--steps", "3", "--time-budget", "0", "--n", "20",
                       "--out", str(out), "--device", "cpu", "--no-bf16")
    assert code == 0 and "recipe 'latent'" in err and "VAE's MNIST latents" in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["train_config"]["bf16"] is False and m["bf16_autocast"] is False  # the recipe's "auto", overridden
    assert m["vae"] == "vae_mnist_f4c4" and m["steps"] == 3 and m["n"] == 20
    assert json.loads((out / "model.json").read_text())["vae"] == "vae_mnist_f4c4"
    assert m["sampling"]["guide_scale"] != 1 and 0 < m["guide_step"] < 3  # autoguidance by an early EMA
    assert json.loads((out / "guide.json").read_text())["step"] == m["guide_step"]
    npz = tmp_path / "s.npz"
    code, _, err = run(capsys, "sample", "--checkpoint", str(out / "model.safetensors"), "--n", "5", "--out", str(npz))
    assert code == 0 and np.load(npz)["images"].shape == (5, 28, 28, 1)  # decoded digits, not 4×8×8 latents
    # no flags: the recipe's sampler, with the guide the demo wrote beside the model
    assert "'steps': 10, 'sampler': 'heun', 'cfg_scale': 1.15, 'shift': 1.0, 'guide_scale': 1.75" in err
    assert f"guide {out / 'guide.safetensors'}" in err
    code, _, err = run(capsys, "sample", "--checkpoint", str(out / "model.safetensors"), "--n", "5", "--steps", "2",
                       "--out", str(npz), "--guide", str(out / "guide.safetensors"), "--guide-scale", "1.5")
    assert code == 0 and "'steps': 2" in err and "'guide_scale': 1.5" in err  # flags win
    alone = tmp_path / "alone"  # the model without its guide
    alone.mkdir()
    for name in ("model.safetensors", "model.json"):
        (alone / name).write_bytes((out / name).read_bytes())
    fails_cleanly(capsys, ["sample", "--checkpoint", str(alone / "model.safetensors"), "--out", str(npz)],
                  "guide scale 1.75 needs a guide model: pass --guide, or --guide-scale 1 for CFG alone")
    code, _, err = run(capsys, "sample", "--checkpoint", str(alone / "model.safetensors"), "--n", "5",
                       "--steps", "2", "--guide-scale", "1", "--out", str(npz))
    assert code == 0 and "'guide_scale': 1.0" in err and "guide " not in err.split("}")[-1]


def test_train_with_an_autoguidance_recipe_writes_its_guide_once(tmp_path, capsys):
    out = tmp_path / "lat"
    argv = ["train", "--recipe", "latent", "--steps", "6", "--time-budget", "0", "--batch-size", "8",
            "--out", str(out), "--device", "cpu", "--no-bf16"]
    assert run(capsys, *argv)[0] == 0
    guide = json.loads((out / "guide.json").read_text())
    assert guide["step"] == 2 and guide["recipe"] == "latent"  # the first step at ≥ 18 % of 6
    argv[argv.index("6")] = "8"
    code, _, err = run(capsys, *argv, "--resume")
    assert code == 0 and "resumed from step 6" in err
    assert json.loads((out / "guide.json").read_text())["step"] == 2  # kept, not re-taken at the resumed step
    code, _, err = run(capsys, "sample", "--checkpoint", str(out / "model.safetensors"), "--n", "4", "--steps", "1",
                       "--out", str(tmp_path / "s.npz"))
    assert code == 0 and f"guide {out / 'guide.safetensors'}" in err and "'guide_scale': 1.75" in err


def test_kill_9_during_training_then_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    """`minidit train` killed with SIGKILL leaves a complete checkpoint (atomic writes); --resume continues from it
    and ends with exactly the weights of a run that was never interrupted."""
    killed, log = tmp_path / "killed", tmp_path / "log.txt"
    threads = str(torch.get_num_threads())  # the same in both processes: the same floating-point sums
    argv = [*TINY, "--steps", "1000", "--checkpoint-every", "3", "--threads", threads]
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "minidit", "train", *argv, "--out", str(killed)], cwd=ROOT,
                                stdout=f, stderr=f)
    state = killed / "train_state.safetensors"
    try:
        deadline = time.monotonic() + 240
        while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # let it go on: the kill may land mid-step or mid-write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and state.exists(), log.read_text()[-2000:]
    step = read_meta(state)["step"]
    assert step % 3 == 0 and 3 <= step < 1000
    assert not (killed / "model.safetensors").exists()
    end = step + 2
    code, stdout, err = run(capsys, "train", *argv[:-4], "--steps", str(end), "--out", str(killed), "--resume")
    assert code == 0 and f"resumed from step {step}" in err and f"trained {end} steps" in stdout
    straight = tmp_path / "straight"
    assert run(capsys, "train", *TINY, "--steps", str(end), "--out", str(straight))[0] == 0
    a, b = load_file(str(killed / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_latent_train_rejects_images_its_vae_cannot_encode(tmp_path, capsys, monkeypatch):
    import minidit.data

    monkeypatch.setattr(minidit.data, "dataset_tensors", lambda *a: (torch.zeros(4, 3, 32, 32), torch.zeros(4).long()))
    line = fails_cleanly(capsys, ["train", "--recipe", "latent", "--dataset", "cifar10", "--out", str(tmp_path / "o")],
                         "the VAE's images are (B, 1, 28, 28)")
    assert "(4, 3, 32, 32)" in line


# ---- expected errors: one line, exit status 2, no traceback ------------------------------------------------------
@pytest.mark.parametrize("argv,match", [
    ([], "the following arguments are required: command"),
    (["nope"], "invalid choice: 'nope'"),
    (["train"], "the following arguments are required: --out"),
    (["train", "--out", "o", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["train", "--out", "o", "--recipe", "huge"], "argument --recipe: invalid choice: 'huge'"),
    (["sample", "--checkpoint", "c.safetensors", "--out", "x.npz", "--sampler", "rk4"], "invalid choice: 'rk4'"),
    (["vae", "fly"], "argument action: invalid choice: 'fly'"),
    (["evaluate"], "the following arguments are required: samples"),
])
def test_bad_arguments_are_one_line(capsys, argv, match):
    fails_cleanly(capsys, argv, match, command=argv[0] if argv and argv[0] != "nope" else "")
    with pytest.raises(SystemExit):  # the same through argparse directly: the usage text is not printed
        build_parser().parse_args(argv)
    assert "usage:" not in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["sample", "--checkpoint", "/nonexistent.safetensors", "--out", "x.npz"], "no checkpoint at /nonexistent"),
    (["sample", "--checkpoint", "x.safetensors", "--out", "x.png"], "an --out ending in .npz"),
    (["sample", "--checkpoint", "x.safetensors", "--out", "x.npz", "--n", "0"], "need --n ≥ 1"),
    (["train", "--dataset", "cifar10", "--data-root", "/nonexistent", "--out", "o"], "CIFAR10 was not found under "
                                                                                      "/nonexistent"),
    (["train", "--dataset", "mnist", "--data-root", "/nonexistent", "--out", "o"], "--download"),
    (["train", "--out", "o", "--lr", "-1"], "invalid TrainConfig: lr=-1.0"),
    (["demo", "--threads", "0"], "--threads must be ≥ 1, got 0"),
    (["train", "--out", "o", "--device", "cuda:7"], "CUDA is not available") if not torch.cuda.is_available() else
    (["train", "--out", "o", "--threads", "-2"], "--threads must be"),
    (["evaluate", "/nonexistent.npz"], "need an .npz with arrays 'images'"),
    (["vae", "train"], "vae train needs --out"),
    (["vae", "evaluate", "/nonexistent.safetensors"], "no checkpoint at"),
    (["notebooks", "/nonexistent"], "not a notebook or a folder"),
])
def test_clear_errors(capsys, argv, match):
    fails_cleanly(capsys, argv, match)


def test_resume_without_a_state_or_with_a_truncated_one(tmp_path, capsys):
    out = tmp_path / "r"
    fails_cleanly(capsys, ["train", *TINY, "--steps", "2", "--out", str(out), "--resume"], "no checkpoint at")
    assert run(capsys, "train", *TINY, "--steps", "2", "--out", str(out))[0] == 0
    state = out / "train_state.safetensors"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    fails_cleanly(capsys, ["train", *TINY, "--steps", "4", "--out", str(out), "--resume"], "truncated")


def test_resume_with_another_recipe_config_objective_or_seed(tmp_path, capsys):
    out = tmp_path / "r"
    assert run(capsys, "train", *TINY, "--steps", "1", "--out", str(out))[0] == 0
    base = ["train", "--batch-size", "16", "--device", "cpu", "--time-budget", "0", "--steps", "2", "--out", str(out),
            "--resume"]
    fails_cleanly(capsys, [*base, "--recipe", "flagship"], "was trained with config")
    fails_cleanly(capsys, [*base, "--recipe", "tiny", "--config", "mnist-s2"], "was trained with config")
    fails_cleanly(capsys, [*base, "--recipe", "tiny", "--objective", "ddpm"], "objective 'flow'")
    fails_cleanly(capsys, [*base, "--recipe", "tiny", "--seed", "5"], "seed 0, this run has 'flow' and 5")


def test_sample_rejects_foreign_files_and_bad_labels(tmp_path, capsys):
    npz = str(tmp_path / "a.npz")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04garbage")
    fails_cleanly(capsys, ["sample", "--checkpoint", str(bad), "--out", npz], "never unpickles")
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, pt)
    fails_cleanly(capsys, ["sample", "--checkpoint", str(pt), "--out", npz], "never unpickles")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    fails_cleanly(capsys, ["sample", "--checkpoint", str(foreign), "--out", npz], "not a minidit checkpoint")
    assert run(capsys, "train", *TINY, "--steps", "1", "--out", str(tmp_path / "r"))[0] == 0
    model = str(tmp_path / "r" / "model.safetensors")
    fails_cleanly(capsys, ["sample", "--checkpoint", model, "--out", npz, "--labels", "12"],
                  "--labels must be in [0, 9]")
    fails_cleanly(capsys, ["sample", "--checkpoint", model, "--out", npz, "--labels", "three"],
                  "--labels must be 'balanced' or comma-separated class ids")
    fails_cleanly(capsys, ["sample", "--checkpoint", model, "--out", npz, "--cfg-scale", "-1"],
                  "cfg_scale and guide_scale must be ≥ 0", before=1)  # after the "sampling with {settings}" line
    vae = str(weights_path("vae_mnist_f4c4"))
    fails_cleanly(capsys, ["sample", "--checkpoint", vae, "--out", npz], "holds a 'vae' checkpoint")


def test_evaluate_rejects_wrong_arrays(tmp_path, capsys):
    p = tmp_path / "w.npz"
    np.savez(p, images=np.zeros((3, 32, 32, 3), np.uint8), labels=np.zeros(3))
    fails_cleanly(capsys, ["evaluate", str(p)], "'images' must be uint8 (N, 28, 28, 1)")
    np.savez(p, images=np.zeros((3, 28, 28, 1), np.float32), labels=np.zeros(3))
    fails_cleanly(capsys, ["evaluate", str(p)], "got float32")
    np.savez(p, pictures=np.zeros((3, 28, 28, 1), np.uint8))
    fails_cleanly(capsys, ["evaluate", str(p)], "need an .npz with arrays 'images'")
    p.write_bytes(pickle.dumps({"images": 1}))
    fails_cleanly(capsys, ["evaluate", str(p)], "need an .npz")


def test_errors_through_python_m_minidit_print_no_traceback(tmp_path):
    """The real entry point (a separate process): argparse errors and a corrupt resume state are one line."""
    r = python_m_minidit("sample", "--checkpoint", "c.safetensors", "--out", "x.npz", "--steps", "two")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["minidit sample: error: argument --steps: invalid int value: 'two'"]
    out = tmp_path / "r"
    out.mkdir()
    (out / "train_state.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"__metadata__\":")  # truncated
    r = python_m_minidit("train", *TINY, "--steps", "2", "--out", str(out), "--resume", "--threads", "1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("minidit train: error: ") and "truncated" in lines[0], r.stderr
