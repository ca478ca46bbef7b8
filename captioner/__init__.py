"""captioner: CNN features -> LSTM initial state -> caption text.

    from captioner import Captioner
    Captioner.from_pretrained().caption("photo.jpg")
"""

from .api import Captioner

__all__ = ["Captioner"]
