"""One file per method, each registering its `Edit` class with ``@register``: importing this package imports
every module in it, so a new method is a new file here (and its test file), nothing else."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
