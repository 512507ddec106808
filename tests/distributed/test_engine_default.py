"""The default, single-process path never imports Ray; the ray flags are checked before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_default_extract_does_not_import_ray(tiny_model_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("The cat sat.\nA dog ran far away.\n", encoding="utf-8")
    code = (
        "import sys\n"
        "from sparsefinder.cli import main\n"
        f"rc = main(['extract', '--corpus', {str(corpus)!r}, '--model', {str(tiny_model_dir('bert'))!r}, "
        f"'--device', 'cpu', '--out', {str(tmp_path / 'out')!r}, '--split', 'all'])\n"
        "assert rc == 0, rc\n"
        "assert (sys.modules.get('ray'), sys.modules.get('sparsefinder.distributed.ray_extract')) == (None, None)\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                              "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_resume_needs_the_ray_engine(tmp_path, capsys):
    from sparsefinder.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("The cat sat.\n", encoding="utf-8")
    assert main(["extract", "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume continues an interrupted --engine ray extraction" in err


def test_bad_worker_count_is_a_usage_error(capsys):
    import pytest

    from sparsefinder.cli import main

    with pytest.raises(SystemExit) as e:
        main(["extract", "--engine", "ray", "--workers", "0", "--out", "x"])
    assert e.value.code == 2 and "must be a whole number >= 1" in capsys.readouterr().err


def test_engine_ray_without_ray_says_how_to_install(tmp_path, capsys, monkeypatch):
    from sparsefinder.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray looks like to an import
    corpus = tmp_path / "c.txt"
    corpus.write_text("The cat sat.\n", encoding="utf-8")
    assert main(["extract", "--engine", "ray", "--corpus", str(corpus), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'sparsefinder[ray]'" in err
    assert not (tmp_path / "o").exists()
