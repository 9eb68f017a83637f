"""Models, their loaders and tokenizers.

Importing this package loads no torch: the tokenizer and spec modules are plain Python, so the
engine and the server can use them; the modules that build models import torch themselves.
"""
