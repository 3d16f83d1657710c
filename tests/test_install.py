"""The install path: the plugin's fairseq check, --user-dir registration, the bootstrap fast path,
and a non-editable install's console command run from another folder."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fairseq_helpers import REPO, run


def _import_plugin(tmp_path, prelude=""):
    code = textwrap.dedent(prelude) + "\nimport fairseq_clusterformer\n"
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)


def test_missing_fairseq_leaves_the_core_usable_and_names_the_fix(tmp_path):
    # Without fairseq the package imports (the attention core needs only torch) and registers
    # nothing; asking for the fairseq model names the fix.
    proc = _import_plugin(tmp_path, "import sys; sys.modules['fairseq'] = None")
    assert proc.returncode == 0, proc.stderr
    code = "import sys; sys.modules['fairseq'] = None\nimport fairseq_clusterformer.models\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "FairseqUnusableError" in proc.stderr
    assert "fairseq is not installed" in proc.stderr or "needs fairseq" in proc.stderr
    assert "bash scripts/bootstrap.sh" in proc.stderr
    assert "fairseq-fixed==0.12.3.1" in proc.stderr


def test_broken_fairseq_names_the_fix(tmp_path):
    # A fairseq that fails at import the way 0.12.2 does on Python 3.11.
    fake = tmp_path / "fake" / "fairseq"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ValueError('mutable default <class list> for field x')\n")
    proc = _import_plugin(tmp_path, f"import sys; sys.path.insert(0, {str(fake.parent)!r})")
    assert proc.returncode != 0
    assert "does not import on Python" in proc.stderr
    assert "mutable default" in proc.stderr
    assert "pip uninstall -y fairseq" in proc.stderr


def test_too_old_fairseq_names_the_missing_piece(tmp_path):
    fake = tmp_path / "fake" / "fairseq"
    (fake / "models").mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.9.0'\n")
    (fake / "models" / "__init__.py").write_text("")
    (fake / "models" / "transformer.py").write_text("TransformerModel = object\n")
    proc = _import_plugin(tmp_path, f"import sys; sys.path.insert(0, {str(fake.parent)!r})")
    assert proc.returncode != 0
    assert "fairseq 0.9.0" in proc.stderr and "TransformerEncoderBase is missing" in proc.stderr


def test_user_dir_registers_plugin_arch():
    out = run(
        [
            sys.executable,
            "-c",
            (
                "from fairseq import options;"
                "p = options.get_training_parser();"
                "a = options.parse_args_and_arch(p, ['/nonexistent', '--user-dir', 'fairseq_clusterformer',"
                " '--arch', 'clusterformer_iwslt', '--task', 'translation']);"
                "print('ARCH', a.arch, a.encoder_attention_heads, a.num_clusters, a.causal_window)"
            ),
        ]
    )
    assert "ARCH clusterformer_iwslt 8 3 64" in out.stdout


def test_bootstrap_second_run_is_the_fast_path():
    # Point the bootstrap at the environment running this test: after one run (normally already
    # the fast path, since test.sh ran it), a second run must skip every install step.
    env = {"CLUSTERFORMER_VENV": sys.prefix}
    run(["bash", REPO / "scripts" / "bootstrap.sh"], env=env)
    out = run(["bash", REPO / "scripts" / "bootstrap.sh"], env=env)
    assert "environment up to date" in out.stdout, out.stdout
    assert "installing" not in out.stdout


def _tree(folder):
    """{path: (size, mtime)} of every file and folder under FOLDER."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*")}


@pytest.mark.install
def test_non_editable_install_runs_choose_k_from_any_folder(tmp_path):
    """`pip install .` (not editable) into a throwaway folder: clusterformer-choose-k answers --help
    and plans a sweep (--dry-run) from another folder, with its defaults in that folder (output
    under ./work/choose_k, fairseq's --user-dir the installed package), and writes nothing into the
    installed package, nor anything at all in a dry run. The harness (scripts/) is not installed."""
    src, site, cwd = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    # a copy of the sources: building in place would leave build/ and *.egg-info in the checkout
    shutil.copytree(
        REPO / "fairseq_clusterformer", src / "fairseq_clusterformer", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("setup.py", "README.md", "pyproject.toml", "fairseq_clusterformer_autoload.py"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    run([*pip, "--target", site, src], timeout=300)
    assert sorted(p.name for p in (site / "bin").iterdir()) == [
        "clusterformer-autoload",
        "clusterformer-average-checkpoints",
        "clusterformer-choose-k",
        "clusterformer-mt-prep",
        "clusterformer-show-clusters",
    ]
    assert not (site / "scripts").exists() and not (site / "fairseq_clusterformer" / "tools" / "expkit.py").exists()
    cwd.mkdir()
    installed = _tree(site)
    # the installed copy, not the checkout's: PYTHONPATH comes before the editable install's finder
    env = {"PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    choose_k = site / "bin" / "clusterformer-choose-k"
    out = run([choose_k, "--help"], cwd=cwd, env=env).stdout
    assert "--dry-run" in out and "(default: work/choose_k)" in " ".join(out.split())
    out = run(
        [choose_k, "--data", "data-bin", "--ks", "2,4", "--max-update", "5", "--dry-run"], cwd=cwd, env=env
    ).stdout
    assert out.count("would train 5 updates") == 2
    assert f"--user-dir {site / 'fairseq_clusterformer'} " in out
    assert "--save-dir work/choose_k/k4.s1/checkpoints" in out
    assert f"would write {cwd / 'work' / 'choose_k' / 'choose_k.json'}" in out
    assert list(cwd.iterdir()) == []
    assert _tree(site) == installed
