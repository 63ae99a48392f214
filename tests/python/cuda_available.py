"""The module-level gate of the CUDA test files: skip without a GPU or a CUDA build, or fail
when FUSED_ADAGRAD_REQUIRE_CUDA=1 says this machine must run them."""
import os

import pytest
import torch

import fused_adagrad


def skip_or_fail_without_cuda():
    if not torch.cuda.is_available():
        why = "no CUDA device: torch.cuda.is_available() is False"
    elif not fused_adagrad.build_info()["cuda"]:
        why = "fused_adagrad was built without CUDA: build_info()['cuda'] is False"
    else:
        return
    if os.environ.get("FUSED_ADAGRAD_REQUIRE_CUDA") == "1":
        pytest.fail(f"{why} (FUSED_ADAGRAD_REQUIRE_CUDA=1)", pytrace=False)
    pytest.skip(why, allow_module_level=True)
