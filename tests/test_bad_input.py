"""An adversarial user at the command line: every bad input is one line (exit 2, no traceback) before any
work, and nothing that was there before is changed. The CLIs run as subprocesses, as a user runs them."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from evar.outputs import claim_output
from evar.zoo import BUILTIN

EVAR = [sys.executable, "-m", "evar.apps.cli"]
EXPORT = [sys.executable, "-m", "evar.export.cli"]
BENCH = [sys.executable, "-m", "evar.runtime.bench"]
ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    for w in words:
        assert w in err, (w, err)
    assert "weights_only=False" not in err
    return err


def snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` (or `path` itself) with its bytes' digest, and the modes of folders."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else oct(p.stat().st_mode)
    return out


def users_folder(tmp: Path) -> Path:
    folder = tmp / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "sub" / "data.csv").write_text("1,2,3")
    return folder


def fake_artifact(tmp: Path) -> Path:
    art = tmp / "art"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({"format": "evar-artifact", "format_version": 1}))
    (art / "decoder_step.onnx").write_bytes(b"graph")
    return art


def test_existing_user_outputs_are_refused_and_untouched(tmp_path):
    folder, plain = users_folder(tmp_path), tmp_path / "notes.txt"
    plain.write_text("keep me")
    before = snapshot(folder), snapshot(plain)
    cases = {
        "prune into a folder": EVAR + ["prune", "--model", "builtin:digits", "--sparsity", "0.2", "--method",
                                       "magnitude", "--out", str(folder)],
        "prune --overwrite a folder": EVAR + ["prune", "--model", "builtin:digits", "--sparsity", "0.2", "--method",
                                              "magnitude", "--out", str(folder), "--overwrite"],
        "convert onto a file": EVAR + ["convert", "--model", "builtin:digits", "--out", str(plain)],
        "convert --overwrite a file": EVAR + ["convert", "--model", "builtin:digits", "--out", str(plain),
                                              "--overwrite"],
        "export into a folder": EXPORT + ["onnx", "--model", "random:digits", "--out", str(folder)],
        "sample into a folder": EVAR + ["sample", "--classes", "1", "--per-class", "1", "--out", str(folder)],
        "eval report onto a file": EVAR + ["eval", "--per-class", "2", "--out", str(plain)],
        "eval report onto a folder": EVAR + ["eval", "--per-class", "2", "--out", str(folder)],
        "bench json onto a file": BENCH + ["--artifact", str(tmp_path / "none"), "--json", str(plain)],
        "bench plot onto a folder": BENCH + ["--artifact", str(tmp_path / "none"), "--plot", str(folder)],
    }
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(cases, pool.map(lambda c: run(c, tmp_path), cases.values())))
    for name, proc in procs.items():
        assert_one_line(proc), name
    assert (snapshot(folder), snapshot(plain)) == before
    assert "thesis.tex" in procs["prune into a folder"].stderr  # says what is there
    assert "EVAR did not write" in procs["prune --overwrite a folder"].stderr


def test_special_files_and_impossible_places_are_refused_before_work(tmp_path):
    art, plain = fake_artifact(tmp_path), tmp_path / "notes.txt"
    plain.write_text("keep me")
    art_before = snapshot(art)
    model_dir = BUILTIN["digits"]
    cases = {
        "prune into /dev/null": (EVAR + ["prune", "--model", "builtin:digits", "--sparsity", "0.2", "--method",
                                         "magnitude", "--out", "/dev/null"], "special file"),
        "bench json into /dev/null": (BENCH + ["--artifact", str(art), "--json", "/dev/null"], "special file"),
        "inside an artifact": (EVAR + ["convert", "--model", "builtin:digits", "--out", str(art / "m")],
                               "inside the artifact"),
        "below a file": (EVAR + ["convert", "--model", "builtin:digits", "--out", str(plain / "m")], "is a file"),
        "the working directory": (EVAR + ["convert", "--model", "builtin:digits", "--out", "."],
                                  "working directory"),
        "onto its own input": (EVAR + ["convert", "--model", str(model_dir), "--out", str(model_dir)],
                               "overlaps the input"),
        "into its own input": (EVAR + ["prune", "--model", str(model_dir), "--sparsity", "0.2", "--out",
                                       str(model_dir / "pruned")], "overlaps the input"),
    }
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(cases, pool.map(lambda c: run(c[0], tmp_path), cases.values())))
    for name, proc in procs.items():
        assert_one_line(proc, cases[name][1])
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert snapshot(art) == art_before and plain.read_text() == "keep me"
    assert not (model_dir / "pruned").exists()


def test_overwrite_replaces_only_what_evar_made(tmp_path):
    out = tmp_path / "copy"
    first = run(EVAR + ["convert", "--model", "builtin:digits", "--out", str(out)], tmp_path)
    assert first.returncode == 0, first.stderr
    assert_one_line(run(EVAR + ["convert", "--model", "builtin:digits", "--out", str(out)], tmp_path),
                    "existing model directory", "--overwrite")
    # a killed run left its temp folder beside the output: the next run into the same place clears it
    leftover = tmp_path / ".copy.tmp-killed"
    leftover.mkdir()
    (leftover / "var.safetensors").write_bytes(b"0" * 1000)
    again = run(EVAR + ["convert", "--model", "builtin:digits", "--out", str(out), "--overwrite"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert not leftover.exists() and "left by an interrupted run" in again.stderr
    assert (out / "config.json").is_file() and not (tmp_path / ".copy.lock").exists()


@pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders anyway")
def test_read_only_places_are_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert_one_line(run(EVAR + ["convert", "--model", "builtin:digits", "--out", str(parent / "m")], tmp_path),
                        "cannot write")
    finally:
        parent.chmod(0o755)


def test_a_second_run_into_the_same_place_waits_its_turn(tmp_path):
    out = tmp_path / "copy"
    with claim_output(out, "dir"):
        proc = run(EVAR + ["convert", "--model", "builtin:digits", "--out", str(out)], tmp_path)
    assert_one_line(proc, "being written by another EVAR run", f"process {os.getpid()}")
    assert not out.exists()


def bad_model_dirs(tmp: Path) -> dict[str, Path]:
    """Copies of the embedded model, each broken in one way."""
    dirs = {}
    for name in ("typed", "nan", "text"):
        d = tmp / name
        shutil.copytree(BUILTIN["digits"], d)
        dirs[name] = d
    cfg = json.loads((dirs["typed"] / "config.json").read_text())
    cfg["var"]["depth"] = "4"
    (dirs["typed"] / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    state = load_file(str(dirs["nan"] / "var.safetensors"))
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(dirs["nan"] / "var.safetensors"))
    (dirs["text"] / "var.safetensors").write_text("just some text\n")
    return dirs


def test_bad_models_and_values_are_one_line(tmp_path):
    dirs = bad_model_dirs(tmp_path)
    text = tmp_path / "text.pth"
    text.write_text("hello\n")
    cases = {
        "config field of the wrong type": (EVAR + ["info", "--model", str(dirs["typed"])], "VARConfig.depth must be int"),
        "NaN weights": (EVAR + ["info", "--model", str(dirs["nan"])], "NaN"),
        "text as safetensors": (EVAR + ["info", "--model", str(dirs["text"])], "safetensors"),
        "text as a checkpoint": (EVAR + ["info", "--model", "official:d16", "--var-ckpt", str(text), "--vae-ckpt",
                                         str(text)], "not a PyTorch checkpoint"),
        "checkpoint flags on another model": (EVAR + ["info", "--model", "builtin:digits", "--var-ckpt", str(text)],
                                              "--var-ckpt"),
        "backend without an artifact": (EVAR + ["sample", "--backend", "torch-cpu", "--out", "s"], "--artifact"),
        "NaN guidance": (EVAR + ["sample", "--cfg", "nan", "--out", "s"], "--cfg"),
        "infinite guidance": (EVAR + ["eval", "--cfg", "inf"], "--cfg"),
        "negative seed": (EVAR + ["sample", "--seed", "-1", "--out", "s"], "--seed"),
        "seed beyond 64 bits": (EVAR + ["sample", "--seed", str(2**64), "--out", "s"], "--seed"),
        "batch size 0": (EVAR + ["sample", "--batch-size", "0", "--out", "s"], "--batch-size"),
        "top-p 1.5": (EVAR + ["sample", "--top-p", "1.5", "--out", "s"], "--top-p"),
        "unknown class": (EVAR + ["sample", "--classes", "12", "--out", "s"], "--classes"),
    }
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(cases, pool.map(lambda c: run(c[0], tmp_path), cases.values())))
    for name, proc in procs.items():
        assert_one_line(proc, cases[name][1])
    assert not (tmp_path / "s").exists()


def test_torn_resume_file_is_one_line(tmp_path):
    run_dir = tmp_path / "tok"
    run_dir.mkdir()
    (run_dir / "train_state.pt").write_bytes(b"PK\x03\x04 torn by a kill")
    assert_one_line(run(EVAR + ["train-tokenizer", "--out", str(run_dir), "--steps", "2"], tmp_path),
                    "train_state.pt", "delete")


def test_pickled_objects_are_named_as_such(tmp_path):
    import argparse

    import torch

    path = tmp_path / "obj.pth"
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=1)}, path)
    err = assert_one_line(run(EVAR + ["info", "--model", "official:d16", "--var-ckpt", str(path), "--vae-ckpt",
                                      str(path)], tmp_path), "Python objects", "argparse.Namespace")
    assert "corrupt" not in err


def test_interrupt_says_where_progress_waits(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        with claim_output(tmp_path / "out", "dir", progress_note="the calibration set waits in out.partial/"):
            raise KeyboardInterrupt
    assert "out.partial/" in capsys.readouterr().err
    assert not (tmp_path / ".out.lock").exists()


def test_a_refused_run_leaves_no_empty_folders(tmp_path):
    out = tmp_path / "new" / "deeper" / "m"
    assert_one_line(run(EVAR + ["convert", "--model", "builtin:nothing", "--out", str(out)], tmp_path), "nothing")
    assert not (tmp_path / "new").exists()


def test_a_full_disk_is_one_line(monkeypatch, capsys):
    import errno

    import typer

    from evar.errors import run_cli

    app = typer.Typer()

    @app.command()
    def write() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/var.safetensors")

    monkeypatch.setattr(sys, "argv", ["evar"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(app)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "disk is full" in err and "var.safetensors" in err
