"""The ``lowbit`` command line: ``train``, ``compare``, ``ptq``, ``finetune``, ``formats``."""

from lowbit.cli.main import main

__all__ = ["main"]
