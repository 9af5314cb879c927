"""Optional dependencies: a clear error when a subpackage needs the `train` extra."""
import importlib.util

_INSTALL = 'pip install "vdm-jax[train]" (or pip install -e ".[train]" from a clone)'


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def require_train_extra(package: str, *modules: str) -> None:
    """Raises ImportError naming the missing `modules` (import names) that `package` needs."""
    missing = [module for module in modules if not _installed(module)]
    if missing:
        raise ImportError(f"{package} needs the training dependencies, and {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: {_INSTALL}")
