"""Paths: names from recipes, pass configs, cache entries or the filesystem cannot make a run write outside its
output folder (`../`, absolute paths, symlinks at or beside the output)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from compressor.artifacts import atomic_output, inside, remove_stale
from compressor.errors import InputError, RecipeError
from compressor.pipeline import load_and_plan
from _rel_helpers import run_cli


def _recipe(tmp_path: Path, model: Path, name: str = "paths", export: str = "[{pass: export_checkpoint}]") -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(f"schema_version: 1\nname: {json.dumps(name)}\nmodel: {{source: {model}}}\n"
                 f"passes: [{{pass: quantize_rtn, format: int8}}]\nexport: {export}\n")
    return p


@pytest.mark.parametrize("name", ["../x", "../../etc", "/abs/x", "a/../../b", "..", ".hidden", "a\\..\\b", "~/x"])
def test_recipe_name_cannot_leave_the_output_root(tiny_model_dir, tmp_path, name):
    with pytest.raises(RecipeError) as e:
        load_and_plan(str(_recipe(tmp_path, tiny_model_dir, name)), "cpu")
    assert e.value.key == "name" and e.value.line == 2


@pytest.mark.parametrize("export", [
    "[{pass: export_checkpoint, folder: ../escape}]",
    "[{pass: export_checkpoint, folder: /tmp/escape}]",
    "[{pass: export_onnx, folder: ../../escape}]",
    "[{pass: export_onnx, flavour: tensorrt, opset: 21}, {pass: build_engine, folder: ../escape}]",
    "[{pass: export_onnx, flavour: tensorrt, opset: 21}, {pass: build_engine, onnx_folder: /etc}]",
])
def test_export_folder_names_are_plain_names(tiny_model_dir, tmp_path, export):
    with pytest.raises(RecipeError, match="String should match pattern") as e:
        load_and_plan(str(_recipe(tmp_path, tiny_model_dir, export=export)), "h200")
    assert e.value.key.startswith("export.") and e.value.key.endswith("folder")


def test_inside_refuses_escapes(tmp_path):
    root = tmp_path / "out"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "link")
    assert inside(root, "sub/model.onnx") == root / "sub" / "model.onnx"
    for bad in ("../x", "/etc/passwd", "sub/../../x", "link/x", str(tmp_path / "elsewhere")):
        with pytest.raises(InputError, match="outside the output folder"):
            inside(root, bad)


def test_tampered_cache_entry_cannot_copy_outside(tiny_model_dir, tmp_path, home, capsys):
    """A lowering cache entry whose result.json names `../victim` is refused instead of copied out."""
    rec = _recipe(tmp_path, tiny_model_dir)
    rc, _, err = run_cli([rec, "--target", "cpu", "--out", tmp_path / "a", "--quiet"], capsys)
    assert rc == 0, err
    [entry] = list((home / "cache" / "lower").glob("*/*/result.json"))
    meta = json.loads(entry.read_text())
    meta["folders"] = ["../../../../victim"]
    entry.write_text(json.dumps(meta))
    rc, _, err = run_cli([rec, "--target", "cpu", "--out", tmp_path / "b", "--quiet"], capsys)
    assert rc == 2 and "outside the output folder" in err, err
    assert not (tmp_path / "victim").exists() and not (tmp_path / "b").exists()


def test_symlinked_output_is_replaced_not_followed(tiny_model_dir, tmp_path, home, capsys):
    """`out` is a symlink to a folder holding someone's files: refused without --overwrite; with it the link is
    replaced by the new output and the folder it pointed to is untouched. A dangling link is replaced too."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    parent = tmp_path / "outs"
    parent.mkdir()
    out = parent / "run"
    os.symlink(victim, out)
    rec = _recipe(tmp_path, tiny_model_dir)
    rc, _, err = run_cli([rec, "--target", "cpu", "--out", out, "--quiet"], capsys)
    assert rc == 2 and "exists" in err
    rc, _, err = run_cli([rec, "--target", "cpu", "--out", out, "--quiet", "--overwrite"], capsys)
    assert rc == 0, err
    assert not out.is_symlink() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    dangling = parent / "dangling"
    os.symlink(tmp_path / "nowhere", dangling)
    rc, _, err = run_cli([rec, "--target", "cpu", "--out", dangling, "--quiet"], capsys)
    assert rc == 0, err
    assert not dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def test_stale_sibling_symlinks_are_never_followed(tmp_path):
    """A symlink named like a dead run's temporary sibling is left alone (its target is not deleted), a real
    dead sibling is removed, a live one (this process) kept."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    out = tmp_path / "run"
    dead = 2**22 + 12345  # above pid_max's default: no such process
    os.symlink(victim, tmp_path / f".run.partial-{dead}-abc")
    (tmp_path / f".run.partial-{dead}-def").mkdir()
    (tmp_path / f".run.partial-{os.getpid()}-ghi").mkdir()
    removed = remove_stale(out)
    assert [p.name for p in removed] == [f".run.partial-{dead}-def"]
    assert (victim / "precious.txt").read_text() == "keep"
    assert (tmp_path / f".run.partial-{os.getpid()}-ghi").is_dir()


def test_killed_between_the_two_renames_restores_the_previous_output(tmp_path):
    """--overwrite moves the old output aside, then the new one in: a kill between the two leaves `.run.old-PID-*/x`
    and no `run`; the next run puts the old output back before it starts."""
    out = tmp_path / "run"
    dead = 2**22 + 54321
    old = tmp_path / f".run.old-{dead}-xyz"
    (old / "x").mkdir(parents=True)
    (old / "x" / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match="exists"):  # restored, so without --overwrite the run is refused
        with atomic_output(out, overwrite=False):
            pass
    assert (out / "manifest.json").is_file() and not old.exists()
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "manifest.json").write_text('{"new": 1}')
        time.sleep(0)
    assert json.loads((out / "manifest.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
