"""tav: Tune-A-Video on MindSpore (Ascend first, CPU and GPU as fallbacks)."""
import importlib.util as _importlib_util
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _alias_source_kernels():
    # kernels/ sits at the repository root (the agreed layout) and installs as `tav.kernels`
    # (setup.py package_dir). From a source checkout, where `tav/` is imported straight from the
    # working tree, give the root folder the same name so `import tav.kernels` works either way.
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "kernels")) or "tav.kernels" in _sys.modules:
        return
    root_kernels = _os.path.join(_os.path.dirname(here), "kernels")
    init = _os.path.join(root_kernels, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _importlib_util.spec_from_file_location("tav.kernels", init, submodule_search_locations=[root_kernels])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["tav.kernels"] = module
    spec.loader.exec_module(module)


_alias_source_kernels()
