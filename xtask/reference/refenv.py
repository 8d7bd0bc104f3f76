"""Shared set-up for the reference scripts: makes the PyPI reference packages importable under torch 2.x.

robustness 1.2.1 imports `torchvision.models.utils`, which newer torchvision removed; the only name it
uses from there is `load_state_dict_from_url`, which lives in `torch.hub` now.
"""
import sys
import types

import torch.hub

if "torchvision.models.utils" not in sys.modules:
    shim = types.ModuleType("torchvision.models.utils")
    shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    sys.modules["torchvision.models.utils"] = shim
