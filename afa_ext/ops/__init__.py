"""Everything below autograd: the only code that touches ``torch.ops``.

- schemas.py: the eight squared-distance ops' schemas, written once for every library;
- formulas.py: their fake (meta) kernels and autograd formulas;
- extension.py: loading the compiled extension afa_ext._C (the ``afa_ext`` library);
- triton/: the Triton backend (``afa_ext_triton``), imported only when it is first used;
- functions.py: the partial sums of all layers in one op call, as autograd Functions;
- backends.py, auto_choice.py: which backends exist, and which one ``auto`` picks;
- validation.py: the argument checks the public API and the fake kernels share.
"""

from .backends import BACKEND_CHOICES, BackendUnavailableError, available_backends
from .extension import build_info, empty_cache

__all__ = ["BACKEND_CHOICES", "BackendUnavailableError", "available_backends", "build_info", "empty_cache"]
