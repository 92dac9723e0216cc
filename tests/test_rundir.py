"""Run folders: locked, never mixed, a status in summary.json, resume from saved importance, and
restarts of fit / compare after a SIGKILL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dpruner_lightning.rundir import LOCK, acquire_lock, claim_run_dir, release_lock

from .conftest import REPO

SMOKE = REPO / "configs" / "smoke.yaml"


def _fit(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dpruner_lightning.cli", "fit", "--config", str(SMOKE),
           "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.version", "fixed",
           "--model.output.export_sparse", "false", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_lock_refuses_a_second_live_writer_and_takes_over_a_stale_one(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(str(sleeper.pid))
        with pytest.raises(RuntimeError, match=rf"another dpruner run \(pid {sleeper.pid}\) is writing to"):
            acquire_lock(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    acquire_lock(tmp_path)  # its process is gone: the lock is stale
    assert (tmp_path / LOCK).read_text() == str(os.getpid())
    release_lock(tmp_path)
    assert not (tmp_path / LOCK).exists()


def test_an_earlier_run_is_refused_and_overwrite_removes_only_what_a_run_wrote(tmp_path):
    run = tmp_path / "run"
    (run / "pruned_model").mkdir(parents=True)
    (run / "pruned_model" / ".dpruner_export.json").write_text(json.dumps({"kind": "pruned_model", "files": ["a.bin"]}))
    (run / "pruned_model" / "a.bin").write_text("x")
    for name in ("summary.json", "masks.safetensors", "events.out.tfevents.1.host", "notes.md"):
        (run / name).write_text("{}" if name == "summary.json" else "old")
    with pytest.raises(FileExistsError, match="already holds a run .*overwrite: true"):
        claim_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["pruned_model", "summary.json", "masks.safetensors", "events.out.tfevents.1.host", "notes.md"])
    claim_run_dir(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [LOCK, "notes.md"]  # the user's file stays
    release_lock(run)


def test_fit_into_a_used_folder_fails_clearly_then_overwrite_replaces_it(tmp_path):
    proc = _fit(tmp_path)
    # the noise issue 12 listed, each fixed at its cause: none of it in a plain fit's log
    for noise in ("litlogger", "args parameter is intended", "will override", "module(s) in eval mode",
                  "Token indices sequence length"):
        assert noise not in proc.stderr and noise not in proc.stdout, noise
    run = tmp_path / "smoke" / "fixed"
    first = _summary(run)
    assert first["status"] == "complete" and first["perplexity"]["pruned"]["domain"] > 1
    assert not (run / LOCK).exists()  # released at the end
    config = (run / "config.yaml").read_text()
    again = _fit(tmp_path, "--model.mask.sparsity", "0.3", check=False)
    assert again.returncode == 2
    assert "already holds a run (status 'complete')" in again.stderr and "Traceback" not in again.stderr
    assert (run / "config.yaml").read_text() == config and _summary(run) == first  # untouched
    _fit(tmp_path, "--model.mask.sparsity", "0.3", "--model.output.overwrite", "true")
    assert _summary(run)["sparsity_target"] == 0.3 and _summary(run)["status"] == "complete"


def test_bad_input_exits_2_with_one_line_and_verbose_shows_the_traceback(tmp_path):
    proc = _fit(tmp_path, "--model.mask.granularity", "3:5", check=False)
    assert proc.returncode == 2
    assert "dpruner: error: granularity 3:5 needs every target's in_features divisible by 5" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _summary(tmp_path / "smoke" / "fixed")["status"] == "failed"
    proc = _fit(tmp_path / "v", "--model.mask.granularity", "3:5", "--verbose", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_failed_run_records_its_error(tmp_path):
    proc = _fit(tmp_path, "--model.method.init_args.alpha", "10", "--model.method.init_args.update", "sgd",
                "--model.method.init_args.lambda_reg", "1e6", "--model.method.init_args.keep_updated_weights", "true",
                check=False)
    assert proc.returncode == 1 and "dpruner: failed: perplexity on eval set" in proc.stderr and "is not finite" in proc.stderr
    summary = _summary(tmp_path / "smoke" / "fixed")
    assert summary["status"] == "failed" and "NonFiniteError" in summary["error"]
    assert not (tmp_path / "smoke" / "fixed" / "pruned_model").exists()


KILL_DURING_EXPORT = """
import os, signal, sys
import dpruner_lightning.export as export

def die(model, tokenizer, folder):
    (folder / "config.json").write_text("{}")  # half an export, inside the temp folder
    os.kill(os.getpid(), signal.SIGKILL)

export.write_hf_folder = die
from dpruner_lightning.cli import main
main(sys.argv[1:])
"""


def test_fit_killed_mid_export_leaves_no_partial_model_and_resumes_from_its_importance(tmp_path):
    cmd = [sys.executable, "-c", KILL_DURING_EXPORT, "fit", "--config", str(SMOKE),
           "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.version", "killed",
           "--model.output.export_sparse", "false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    killed = tmp_path / "smoke" / "killed"
    assert not (killed / "pruned_model").exists()  # only a hidden temp folder, removed by the next export
    assert _summary(killed)["status"] == "running"  # never mistaken for a finished run
    assert {"general_importance.safetensors", "dual_importance.safetensors"} <= {p.name for p in killed.iterdir()}

    _fit(tmp_path, "--model.resume_from", str(killed))
    resumed = tmp_path / "smoke" / "fixed"
    summary = _summary(resumed)
    assert summary["status"] == "complete" and not {"general", "dual"} & set(summary["seconds"])  # no pass re-ran
    _fit(tmp_path / "ref")  # an uninterrupted run gives the same masks
    reference = load_file(str(tmp_path / "ref" / "smoke" / "fixed" / "masks.safetensors"))
    got = load_file(str(resumed / "masks.safetensors"))
    assert set(got) == set(reference) and all(bool((got[k] == reference[k]).all()) for k in got)
    leftovers = [p.name for p in killed.iterdir() if "pruned_model" in p.name]
    assert leftovers and all(n.startswith(".dpruner-tmp.") for n in leftovers)  # hidden; the next export clears it


KILL_ON_SECOND_ROW = """
import os, signal, sys
import dpruner_lightning.comparison as comparison

original = comparison.run_row
def run_row(row, *args, **kwargs):
    if row.label == "wanda" and os.environ.get("KILL_ROW"):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(row, *args, **kwargs)

comparison.run_row = run_row
from dpruner_lightning.cli import main
main(sys.argv[1:])
"""


def test_compare_killed_mid_way_keeps_finished_rows_and_the_restart_appends(tmp_path):
    config = tmp_path / "compare.yaml"
    config.write_text(SMOKE.read_text().replace("path: configs/", f"path: {REPO}/configs/") + textwrap.dedent("""
        compare:
          methods: [dense, magnitude, wanda]
        """))
    cmd = [sys.executable, "-c", KILL_ON_SECOND_ROW, "compare", "--config", str(config), "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**env, "KILL_ROW": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    first = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [r["method"] for r in first["rows"]] == ["dense", "magnitude"]
    assert "partial: 2 of 3 rows" in (tmp_path / "out" / "comparison.md").read_text()

    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [r["method"] for r in final["rows"]] == ["dense", "magnitude", "wanda"]
    assert final["rows"][:2] == first["rows"]  # finished rows kept as they were, not re-run
    assert "partial" not in (tmp_path / "out" / "comparison.md").read_text()
    assert "finished in an earlier run" in proc.stderr


def test_a_run_without_logger_never_writes_into_the_current_directory(tmp_path):
    config = tmp_path.parent / f"{tmp_path.name}.yaml"  # outside the folder whose contents are checked
    config.write_text(SMOKE.read_text().replace("path: configs/", f"path: {REPO}/configs/"))
    proc = subprocess.run([sys.executable, "-m", "dpruner_lightning.cli", "fit", "--config", str(config),
                           "--trainer.logger", "false", "--model.output.export_sparse", "false"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    run = tmp_path / "runs" / "unlogged"
    assert _summary(run)["status"] == "complete" and (run / "pruned_model" / "config.json").exists()
