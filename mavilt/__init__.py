"""MAViLT on Ray: one generative model that reads and writes chest X-rays and radiology reports."""

__version__ = "0.1.0"


def load_bundle(path, device=None):
    """Load a model bundle (the one loader for evaluation, serving and the CLI); see mavilt.bundle."""
    from mavilt.bundle import load_bundle as _load

    return _load(path, device=device)


__all__ = ["__version__", "load_bundle"]
