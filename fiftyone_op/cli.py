"""`seggpt fiftyone ...`: install the FiftyOne plugin (this folder) where FiftyOne looks for plugins.

Loaded by the core CLI through the `seggpt_plugins.cli` entry point, so only pathlib is imported here
at module level; fiftyone is imported only when the plugins folder has to be read from its config.
"""

from __future__ import annotations

from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent
PLUGIN_NAME = "@seggpt/seggpt"
INSTALL_NAME = "seggpt"  # the link's name inside the plugins folder


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fiftyone", help="the FiftyOne plugin: install it for the App and for delegated workers",
        description=f"The FiftyOne plugin {PLUGIN_NAME} (operator {PLUGIN_NAME}/propagate_labels).")
    actions = parser.add_subparsers(dest="fiftyone_action", metavar="ACTION")

    install = actions.add_parser("install", help="link the plugin into FiftyOne's plugins folder",
                                 description="Link (or copy) the plugin folder into FIFTYONE_PLUGINS_DIR.")
    install.add_argument("--plugins-dir", default=None,
                         help="default: $FIFTYONE_PLUGINS_DIR, else fiftyone's `plugins_dir` config")
    install.add_argument("--copy", action="store_true",
                         help="copy the files instead of linking (a link follows upgrades of this package)")
    install.add_argument("--force", action="store_true", help="replace another install of the same name")
    install.set_defaults(handler=_install)

    uninstall = actions.add_parser("uninstall", help="remove the plugin from FiftyOne's plugins folder")
    uninstall.add_argument("--plugins-dir", default=None, help="as for install")
    uninstall.set_defaults(handler=_uninstall)

    parser.set_defaults(handler=lambda args: _usage(parser, args))


def _usage(parser, args) -> int:
    if getattr(args, "fiftyone_action", None) is None:
        parser.print_help()
        return 2
    return 0


def plugins_dir(explicit: str | None = None) -> Path:
    """Where FiftyOne looks for plugins: --plugins-dir, $FIFTYONE_PLUGINS_DIR, then fiftyone's config."""
    import os

    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("FIFTYONE_PLUGINS_DIR")
    if env:
        return Path(env).expanduser().resolve()
    from seggpt_plugins.errors import InputError

    try:
        import fiftyone as fo  # reads ~/.fiftyone/config.json (and fiftyone's default)
    except ImportError:
        raise InputError("FiftyOne is not installed here: install the extra (pip install -e '.[fiftyone]' in a "
                         "clone of seggpt-plugins), or name the folder with --plugins-dir or "
                         "FIFTYONE_PLUGINS_DIR") from None
    if not fo.config.plugins_dir:
        raise InputError("FiftyOne has no plugins_dir configured; pass --plugins-dir or set FIFTYONE_PLUGINS_DIR")
    return Path(fo.config.plugins_dir).expanduser().resolve()


def _install(args) -> int:
    import os
    import shutil
    import sys

    root = plugins_dir(args.plugins_dir)
    target = root / INSTALL_NAME
    if target.is_symlink() and target.resolve() == PLUGIN_DIR and not args.copy:
        print(f"{PLUGIN_NAME} is already installed: {target} -> {PLUGIN_DIR}")
        return 0
    if target.exists() or target.is_symlink():
        if not args.force:
            print(f"seggpt fiftyone install: {target} exists; pass --force to replace it", file=sys.stderr)
            return 1
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            shutil.rmtree(target)
    root.mkdir(parents=True, exist_ok=True)
    if args.copy:
        shutil.copytree(PLUGIN_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        how = "copied to"
    else:
        os.symlink(PLUGIN_DIR, target, target_is_directory=True)
        how = "linked at"
    print(f"{PLUGIN_NAME} {how} {target}\n"
          f"FiftyOne finds it when FIFTYONE_PLUGINS_DIR={root} (check: `fiftyone plugins list`); restart a "
          "running App and every `fiftyone delegated launch` worker, whose Python must also import "
          "seggpt_plugins.")
    return 0


def _uninstall(args) -> int:
    import shutil
    import sys

    target = plugins_dir(args.plugins_dir) / INSTALL_NAME
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        manifest = target / "fiftyone.yml"
        if not manifest.is_file() or PLUGIN_NAME not in manifest.read_text(errors="replace"):
            print(f"seggpt fiftyone uninstall: {target} is not this plugin; left alone", file=sys.stderr)
            return 1
        shutil.rmtree(target)
    else:
        print(f"{PLUGIN_NAME} is not installed in {target.parent}")
        return 0
    print(f"removed {target}")
    return 0
