"""captioner: CNN features -> LSTM initial state -> caption text.

    from captioner import Captioner
    Captioner.from_pretrained().caption("photo.jpg")

``Captioner`` is imported on first use: ``import captioner.errors`` (done by ``data_prep`` and the
app) must not pull in torch and the whole API. The dependency points one way: ``data_prep/`` (the
dataset converters) imports this package, never the other way round.
"""

__all__ = ["Captioner"]


def __getattr__(name: str):
    if name == "Captioner":
        from .api import Captioner
        return Captioner
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
