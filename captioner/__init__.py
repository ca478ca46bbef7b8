"""captioner: CNN features -> LSTM initial state -> caption text."""
