"""fluxgymd's trainer-side hook, put first on the trainer's PYTHONPATH by `fluxgymd run`.

- Arms faulthandler on SIGUSR1 for all threads, so the wrapper can record every Python
  process's stacks when a run stops showing life. With FLUXGYMD_STACKS_DIR set the dump goes
  to <dir>/stacks-<pid>.txt (collected into stalls/), otherwise to stderr (the log).
- Gives DataLoaders with worker processes a finite timeout (FLUXGYMD_DATALOADER_TIMEOUT_S,
  default 600 s) so a dead worker fails the attempt instead of hanging it.
- Then chains to any other sitecustomize further down the path, so a site's own hook still runs.
"""
import os
import sys


def _arm_faulthandler() -> None:
    import faulthandler
    import signal

    target = sys.stderr
    stacks_dir = os.environ.get("FLUXGYMD_STACKS_DIR")
    if stacks_dir:
        try:
            os.makedirs(stacks_dir, exist_ok=True)
            # kept open for the life of the process: faulthandler writes to the fd from a signal
            target = open(os.path.join(stacks_dir, f"stacks-{os.getpid()}.txt"), "a", buffering=1)
            target.write(f"# pid {os.getpid()} argv {sys.argv!r}\n")
        except OSError:
            target = sys.stderr
    if target is None:
        return
    faulthandler.register(signal.SIGUSR1, file=target, all_threads=True, chain=False)


def _patch_dataloader_timeout() -> None:
    timeout_s = float(os.environ.get("FLUXGYMD_DATALOADER_TIMEOUT_S", "600") or 0)
    if timeout_s <= 0:
        return
    import importlib.abc
    import importlib.util

    def patch(module) -> None:
        cls = getattr(module, "DataLoader", None)
        if cls is None or getattr(cls, "_fluxgymd_patched", False):
            return
        orig_init = cls.__init__

        def __init__(self, *args, **kwargs):
            if kwargs.get("num_workers", 0) and not kwargs.get("timeout"):
                kwargs["timeout"] = timeout_s
            orig_init(self, *args, **kwargs)

        cls.__init__ = __init__
        cls._fluxgymd_patched = True

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "torch.utils.data.dataloader":
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            if spec is None or spec.loader is None:
                return spec
            loader = spec.loader
            orig_exec = loader.exec_module

            def exec_module(module):
                orig_exec(module)
                patch(module)

            loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    import importlib.util

    for entry in sys.path:
        if not entry or os.path.abspath(entry) == here:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_fluxgymd_chained_sitecustomize", candidate)
            if spec and spec.loader:
                module = importlib.util.module_from_spec(spec)
                try:
                    spec.loader.exec_module(module)
                except Exception as e:  # a broken site hook must not stop training
                    print(f"fluxgymd hook: chained {candidate} failed: {e}", file=sys.stderr)
            return


try:
    _arm_faulthandler()
except Exception as e:  # never break the trainer
    print(f"fluxgymd hook: faulthandler not armed: {e}", file=sys.stderr)
try:
    _patch_dataloader_timeout()
except Exception as e:
    print(f"fluxgymd hook: DataLoader timeout not set: {e}", file=sys.stderr)
_chain()
