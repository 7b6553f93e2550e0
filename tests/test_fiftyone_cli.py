"""`seggpt fiftyone install|uninstall`, run as the real command (no database needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEGGPT = Path(sys.executable).with_name("seggpt")


def seggpt(*args, plugins_dir=None):
    env = {**os.environ}
    if plugins_dir is not None:
        env["FIFTYONE_PLUGINS_DIR"] = str(plugins_dir)
    return subprocess.run([str(SEGGPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_install_links_the_plugin_folder_and_is_idempotent(tmp_path):
    plugins = tmp_path / "plugins"  # created on demand
    first = seggpt("fiftyone", "install", plugins_dir=plugins)
    assert first.returncode == 0, first.stderr
    link = plugins / "seggpt"
    assert link.is_symlink() and link.resolve() == (ROOT / "fiftyone_op").resolve()
    assert (link / "fiftyone.yml").read_text().startswith('name: "@seggpt/seggpt"')
    again = seggpt("fiftyone", "install", plugins_dir=plugins)
    assert again.returncode == 0 and "already installed" in again.stdout


def test_install_refuses_to_replace_something_else_without_force(tmp_path):
    other = tmp_path / "seggpt"
    other.mkdir()
    (other / "fiftyone.yml").write_text('name: "@someone/else"\n')
    refused = seggpt("fiftyone", "install", plugins_dir=tmp_path)
    assert refused.returncode == 1 and "pass --force" in refused.stderr
    assert (other / "fiftyone.yml").read_text() == 'name: "@someone/else"\n'
    kept = seggpt("fiftyone", "uninstall", plugins_dir=tmp_path)
    assert kept.returncode == 1 and other.is_dir()  # not ours: left alone
    forced = seggpt("fiftyone", "install", "--force", "--plugins-dir", str(tmp_path))
    assert forced.returncode == 0, forced.stderr
    assert other.is_symlink()


def test_copy_install_and_uninstall(tmp_path):
    done = seggpt("fiftyone", "install", "--copy", plugins_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    copy = tmp_path / "seggpt"
    modules = {"__init__.py", "operators.py", "options.py", "fields.py", "plan.py", "codecs.py", "segment.py",
               "commit.py", "evaluation.py", "cli.py"}
    assert not copy.is_symlink() and {"fiftyone.yml", *modules} <= {
        p.name for p in copy.iterdir()}
    assert not (copy / "__pycache__").exists()
    gone = seggpt("fiftyone", "uninstall", plugins_dir=tmp_path)
    assert gone.returncode == 0 and not copy.exists()
    assert "not installed" in seggpt("fiftyone", "uninstall", plugins_dir=tmp_path).stdout


def test_cli_module_stays_light():
    """`seggpt --help` imports every adapter's cli module: it must not pull fiftyone or torch in."""
    code = ("import sys, seggpt_plugins.fiftyone.cli, seggpt_plugins.fiftyone\n"
            "heavy = [m for m in ('fiftyone', 'torch', 'transformers', 'numpy') if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    helped = seggpt("fiftyone", "--help")
    assert helped.returncode == 0 and "install" in helped.stdout and "uninstall" in helped.stdout
    bare = seggpt("fiftyone")
    assert bare.returncode == 2 and "install" in bare.stdout


def test_install_without_fiftyone_is_one_line():
    """`seggpt fiftyone install` where FiftyOne is missing: a one-line error naming the fix, no traceback."""
    code = ("import sys; sys.modules['fiftyone'] = None\n"
            "from seggpt_plugins.cli import main\n"
            "sys.exit(main(['fiftyone', 'install']))\n")
    env = {k: v for k, v in os.environ.items() if k != "FIFTYONE_PLUGINS_DIR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "FiftyOne is not installed" in out.stderr
