"""Let stock fairseq commands load ClusterFormer checkpoints without ``--user-dir``.

Opt-in: ``clusterformer-autoload --install`` writes a one-line ``fairseq_clusterformer_autoload.pth``
into the environment's site-packages (``--uninstall`` removes it, ``--status`` tells). The
bootstrap does not install it: a .pth file runs in every Python process of the environment, and
fairseq's own way to load a plugin is ``--user-dir`` (docs/install.md).

At interpreter start the .pth line only adds an import hook: nothing is imported until fairseq
itself imports ``fairseq.checkpoint_utils``. Then ``load_checkpoint_to_cpu`` is wrapped so that,
when the checkpoint about to be read was written by a ClusterFormer model (its pickled config
names the ``clusterformer`` model) and the plugin is not loaded yet, it imports ``fairseq_clusterformer``
first: the model is registered and the checkpoint loads under torch's safe loader as if
``--user-dir fairseq_clusterformer`` had been passed. If the plugin cannot be imported, the error
says so and names ``--user-dir``.

This module is deliberately tiny and imports nothing heavy: it runs in every Python process of
the environment.
"""

import sys

TARGET = "fairseq.checkpoint_utils"
MARKER = b"clusterformer"


def _is_clusterformer_checkpoint(path):
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            return bool(pickles) and MARKER in archive.read(pickles[0])
    except Exception:  # not a zip checkpoint, unreadable: let fairseq report it
        return False


def _patch(checkpoint_utils):
    original = checkpoint_utils.load_checkpoint_to_cpu

    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        if sys.modules.get("fairseq_clusterformer") is None and _is_clusterformer_checkpoint(path):
            try:
                import fairseq_clusterformer  # noqa: F401  (registers models, safe-loader allow-list)
            except ImportError as err:
                raise ImportError(
                    f"{path} is a ClusterFormer checkpoint, but the fairseq_clusterformer plugin "
                    f"could not be imported ({err}). Pass --user-dir /path/to/fairseq_clusterformer."
                ) from err
            # The plugin wrapped this module's loader (safe-loading errors); go through it.
            return checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides, load_on_all_ranks)
        return original(path, arg_overrides, load_on_all_ranks)

    load_checkpoint_to_cpu.__doc__ = original.__doc__
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


class _Finder:
    """A one-shot meta-path finder that patches fairseq.checkpoint_utils right after it loads."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        import importlib.util

        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def install_hook():
    """Called from the .pth file at interpreter start."""
    if TARGET in sys.modules:
        _patch(sys.modules[TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


PTH_NAME = "fairseq_clusterformer_autoload.pth"
PTH_LINE = "import fairseq_clusterformer_autoload; fairseq_clusterformer_autoload.install_hook()\n"


def _pth_path(site_dir=None):
    import os
    import sysconfig

    return os.path.join(site_dir or sysconfig.get_paths()["purelib"], PTH_NAME)


def main(argv=None):
    import argparse
    import os

    parser = argparse.ArgumentParser(description="install or remove the ClusterFormer checkpoint autoload hook")
    group = parser.add_mutually_exclusive_group()
    for flag in ("--install", "--uninstall", "--status"):
        group.add_argument(flag, dest="action", action="store_const", const=flag)
    parser.add_argument(
        "--site-dir", default=None, help="the site directory (default: this environment's site-packages)"
    )
    args = parser.parse_args(argv)
    action = args.action or "--status"
    path = _pth_path(args.site_dir)
    if action == "--install":
        with open(path, "w") as f:
            f.write(PTH_LINE)
        print(f"installed {path}")
    elif action == "--uninstall":
        if os.path.exists(path):
            os.remove(path)
        print(f"removed {path}")
    else:
        print(f"{path}: {'installed' if os.path.exists(path) else 'not installed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
