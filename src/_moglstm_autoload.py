"""Registers moglstm with torch when torch is imported (the ``torch.backends`` entry point).

torch (2.5 and later) calls every function of the ``torch.backends`` entry-point group at
the end of ``import torch`` (meant for out-of-tree extensions; ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``
switches it off). Importing :mod:`moglstm.nn` registers its classes as safe globals and its
custom ops, so a whole model saved with ``torch.save(model)`` loads with ``torch.load``
(``weights_only=True``) and a ``torch.export`` program of the fused op loads with
``torch.export.load`` before the client imports moglstm. A top-level module, so that a
broken moglstm install warns here instead of making ``import torch`` fail.
"""

import warnings


def register() -> None:
    try:
        import moglstm.nn  # noqa: F401  (registers on import)
    except Exception as error:  # never break `import torch`: say what to do instead
        warnings.warn(
            f"moglstm could not register with torch on import ({error!r}); "
            "import moglstm.nn before torch.load or torch.export.load of models that use it",
            stacklevel=2,
        )
