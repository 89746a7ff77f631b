"""Keep TensorFlow's C++ start-up lines off stderr, in the CLI and in its worker processes.

Reads and sets environment variables (``TF_CPP_MIN_LOG_LEVEL``, ``FEATCACHE_QUIET_TF``);
installs a one-shot import hook. Writes nothing.
"""

from __future__ import annotations

import os
import sys

QUIET_ENV = "FEATCACHE_QUIET_TF"


class _QuietTensorFlowImport:
    """A one-shot import hook: the first ``import tensorflow`` (wherever a command makes it,
    directly or through Keras) runs with file descriptor 2 pointed at /dev/null.

    TensorFlow's C++ libraries print their start-up lines ("WARNING: All log messages
    before absl::InitializeLog() ...", "cudart_stub.cc ... Could not find cuda drivers",
    "cpu_feature_guard.cc ... This TensorFlow binary is optimized ...") while they load,
    before anything reads TF_CPP_MIN_LOG_LEVEL, so no environment variable hides them; the
    later ones (oneDNN, cuInit) obey TF_CPP_MIN_LOG_LEVEL=3. Python errors raised by the
    import still show (they are printed after fd 2 is restored)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec(module):
            sys.stderr.flush()
            saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, 2)
                exec_module(module)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                os.close(null)

        spec.loader.exec_module = quiet_exec
        return spec


def quiet_tensorflow(verbose: bool = False) -> None:
    """Only featcache's own lines on stderr: TF_CPP_MIN_LOG_LEVEL=3 (unless set) and the
    import hook above. ``--verbose`` leaves TensorFlow's lines alone."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ[QUIET_ENV] = "1"  # worker processes (featcache.compare.workers) inherit it
    if "tensorflow" not in sys.modules and \
            not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


def quiet_tensorflow_if_asked() -> None:
    """In a worker process: quiet TensorFlow the same way if the parent CLI did."""
    if os.environ.get(QUIET_ENV) == "1":
        quiet_tensorflow()
