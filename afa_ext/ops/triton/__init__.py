"""The Triton backend: kernels.py (the two kernels), launch.py (describing each layer,
splitting the work, one launch per pass) and library.py (the ``afa_ext_triton`` op
library). Nothing here is imported until the Triton backend is first asked about, so
neither ``import afa_ext`` nor a loss on the CPU imports triton."""
