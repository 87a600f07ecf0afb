"""FashionBERT catalog pipeline.

Importing the package registers the model with transformers' auto classes, so that after `import fashionbert`
`transformers.AutoModel.from_pretrained(model_dir)` loads a folder `fashionbert train` wrote (OUT/model or a
checkpoint) as a `FashionBertModel`.

The registration waits until transformers' auto classes are imported (they import torch): `import fashionbert`
itself stays cheap, so `fashionbert --help` answers at once.
"""
import importlib.abc
import sys

__version__ = "0.1.0"  # setup.py's; `fashionbert --version` reads the installed distribution's first

# Registering imports transformers' auto classes and our model, so it waits until no transformers or fashionbert
# module is mid-import (a half-run module cannot be imported from): it runs at the end of the import that first
# brought in an auto class.
_AUTO = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")
_running: set[str] = set()


def _watched(name: str) -> bool:
    return name == "transformers" or name.startswith(("transformers.", "fashionbert."))


def register_with_transformers() -> None:
    """AutoConfig/AutoModel learn the fashionbert model type (idempotent)."""
    from transformers import AutoConfig, AutoModel

    from fashionbert.model.config import MODEL_TYPE, FashionBertConfig
    from fashionbert.model.modeling import FashionBertModel

    AutoConfig.register(MODEL_TYPE, FashionBertConfig, exist_ok=True)
    AutoModel.register(FashionBertConfig, FashionBertModel, exist_ok=True)


class _RegisterWhenLoaded(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of a transformers or fashionbert module so that the end of its loading
    may register."""

    def find_spec(self, name, path, target=None):
        if not _watched(name):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            _running.add(name)
            try:
                exec_module(module)
            finally:
                _running.discard(name)
            _register_when_ready()

        spec.loader.exec_module = exec_then_register  # a loader instance serves one module
        return spec


_FINDER = _RegisterWhenLoaded()


def _register_when_ready() -> None:
    if _running or not any(m in sys.modules for m in _AUTO) or _FINDER not in sys.meta_path:
        return  # a watched module is mid-import (its end calls again), or no auto class is in use yet
    sys.meta_path.remove(_FINDER)
    register_with_transformers()


sys.meta_path.insert(0, _FINDER)
_register_when_ready()  # transformers' auto classes were imported before fashionbert
