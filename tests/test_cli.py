import json

import numpy as np
import pytest
import torch

from minidit.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("cmd", [[], ["train"], ["sample"], ["demo"], ["evaluate"], ["classifier"]])
def test_help(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: minidit" in capsys.readouterr().out


def test_train_resume_sample_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", "--recipe", "tiny", "--steps", "4", "--batch-size", "16",
                          "--out", str(out), "--device", "cpu")
    assert code == 0 and "trained 4 steps" in stdout
    assert {"train_state.safetensors", "train_state.json", "model.safetensors", "model.json", "loss.png"} <= {
        p.name for p in out.iterdir()}
    code, stdout, err = run(capsys, "train", "--recipe", "tiny", "--steps", "6", "--batch-size", "16",
                            "--out", str(out), "--resume", "--device", "cpu")
    assert code == 0 and "resumed from step 4" in err and "trained 6 steps" in stdout
    meta = json.loads((out / "model.json").read_text())
    assert meta["command"] == f"minidit train --recipe tiny --steps 6 --batch-size 16 --out {out} --resume --device cpu"
    assert meta["machine"]["device"] == "cpu" and meta["train_seconds"] > 0

    npz = tmp_path / "s.npz"
    code, stdout, _ = run(capsys, "sample", "--checkpoint", str(out / "model.safetensors"), "--n", "12",
                          "--steps", "2", "--out", str(npz), "--grid", str(tmp_path / "g.png"))
    assert code == 0
    z = np.load(npz)
    assert z["images"].shape == (12, 28, 28, 1) and z["images"].dtype == np.uint8
    assert z["labels"].tolist() == [i % 10 for i in range(12)]
    assert (tmp_path / "g.png").exists()

    code, stdout, _ = run(capsys, "evaluate", str(npz), "--json", str(tmp_path / "m.json"))
    assert code == 0 and 0 <= json.loads((tmp_path / "m.json").read_text())["conditional_accuracy"] <= 1


def test_demo_writes_metrics(tmp_path, capsys):
    code, stdout, _ = run(capsys, "demo", "--recipe", "tiny", "--steps", "3", "--n", "20", "--out", str(tmp_path))
    assert code == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    for k in ("conditional_accuracy", "fid", "fid_floor", "train_seconds", "steps", "parameters"):
        assert k in m
    assert m["steps"] == 3 and (tmp_path / "samples.png").exists() and (tmp_path / "loss.png").exists()
    assert m["machine"]["device"] == "cpu" and m["machine"]["threads"] >= 1  # where the figures were measured
    assert m["command"] == f"minidit demo --recipe tiny --steps 3 --n 20 --out {tmp_path}"
    assert json.loads((tmp_path / "model.json").read_text())["command"] == m["command"]


def test_classifier_records_the_command_that_made_it(tmp_path, capsys):
    from minidit.checkpoint import read_meta

    out = tmp_path / "clf.safetensors"
    code, stdout, _ = run(capsys, "classifier", "--epochs", "1", "--out", str(out))
    meta = read_meta(out)
    assert code == 0 and "held-out accuracy" in stdout
    assert meta["command"] == f"minidit classifier --epochs 1 --out {out}" and meta["epochs"] == 1


def test_grading_commands_match_between_the_two_front_ends():
    from minidit.cli import build_parser
    from minidit.grading.cli import build_parser as grading_parser

    ours = build_parser().parse_args(["grade", "nb.ipynb", "--timeout", "7", "--json", "r.json"])
    theirs = grading_parser().parse_args(["grade", "nb.ipynb", "--timeout", "7", "--json", "r.json"])
    assert vars(ours) == vars(theirs) and ours.timeout == 7.0 and ours.json_path == "r.json"
    assert build_parser().parse_args(["exercises", "--check"]).func is \
        grading_parser().parse_args(["make-exercises", "--check"]).func
    assert build_parser().parse_args(["autograder", "A1"]).assignment == "A1"


@pytest.mark.parametrize("argv,match", [
    (["sample", "--checkpoint", "/nonexistent.safetensors", "--out", "x.npz"], "no checkpoint at"),
    (["sample", "--checkpoint", "x.safetensors", "--out", "x.png"], "must be a .npz"),
    (["sample", "--checkpoint", "x.safetensors", "--out", "x.npz", "--n", "0"], "--n must be"),
    (["train", "--dataset", "cifar10", "--data-root", "/nonexistent", "--out", "o"], "was not found"),
    (["train", "--out", "o", "--lr", "-1"], "invalid TrainConfig"),
    (["demo", "--threads", "0"], "--threads must be"),
])
def test_clear_errors(capsys, argv, match):
    code, _, err = run(capsys, *argv)
    assert code == 2 and match in err and "Traceback" not in err


def test_sample_rejects_foreign_file_and_bad_labels(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04garbage")
    code, _, err = run(capsys, "sample", "--checkpoint", str(bad), "--out", str(tmp_path / "a.npz"))
    assert code == 2 and "never unpickles" in err
    code, _, _ = run(capsys, "train", "--recipe", "tiny", "--steps", "1", "--batch-size", "8",
                     "--out", str(tmp_path / "r"))
    code, _, err = run(capsys, "sample", "--checkpoint", str(tmp_path / "r" / "model.safetensors"),
                       "--out", str(tmp_path / "a.npz"), "--labels", "12")
    assert code == 2 and "--labels must be in [0, 9]" in err


def test_evaluate_rejects_wrong_arrays(tmp_path, capsys):
    p = tmp_path / "w.npz"
    np.savez(p, images=np.zeros((3, 32, 32, 3), np.uint8), labels=np.zeros(3))
    code, _, err = run(capsys, "evaluate", str(p))
    assert code == 2 and "uint8 (N, 28, 28, 1)" in err


def test_latent_demo_then_sample_decodes_with_the_recorded_vae(tmp_path, capsys):
    out = tmp_path / "demo"
    code, _, err = run(capsys, "demo", "--recipe", "latent", "--steps", "3", "--time-budget", "0", "--n", "20",
                       "--out", str(out), "--device", "cpu", "--no-bf16")
    assert code == 0 and "latents of VAE 'vae_mnist_f4c4'" in err
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
    code, _, err = run(capsys, "sample", "--checkpoint", str(alone / "model.safetensors"), "--out", str(npz),
                       "--guide-scale", "1.5")
    assert code == 2 and "needs --guide" in err
    code, _, err = run(capsys, "sample", "--checkpoint", str(alone / "model.safetensors"), "--n", "5",
                       "--steps", "2", "--out", str(npz))
    assert code == 0 and "sampling with CFG alone" in err and "'guide_scale': 1.0" in err


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


def test_latent_train_rejects_images_its_vae_cannot_encode(tmp_path, capsys, monkeypatch):
    import minidit.data

    monkeypatch.setattr(minidit.data, "dataset_tensors", lambda *a: (torch.zeros(4, 3, 32, 32), torch.zeros(4).long()))
    code, _, err = run(capsys, "train", "--recipe", "latent", "--dataset", "cifar10", "--out", str(tmp_path / "o"))
    assert code == 2 and "recipe 'latent' with dataset 'cifar10'" in err
    assert "the VAE takes images (B, 1, 28, 28)" in err and "(4, 3, 32, 32)" in err
