"""64-bit indexing: features whose elements lie more than 2^31 elements apart.

The features (op_checks.far_apart_features) are a few elements of a 4 GiB (virtual) storage, placed with as_strided at
both ends of it; untouched pages of the storage are never backed by memory, so the test
needs only a few KiB. A 32-bit element offset would wrap and read the wrong elements.
"""

import pytest
import torch

import afa_ext
from op_checks import check_ops_read_beyond_2_31

pytestmark = pytest.mark.skipif("cpu" not in afa_ext.available_backends(), reason="afa_ext._C not built")


def test_cpu_kernels_read_elements_beyond_2_31():
    check_ops_read_beyond_2_31(torch.ops.afa_ext)
