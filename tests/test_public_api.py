"""The top-level ``moe_lab`` API: cheap import, lazy names, version."""

from __future__ import annotations

import subprocess
import sys

import pytest

import moe_lab


def test_import_does_not_load_torch():
    code = "import sys, moe_lab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_resolve():
    from moe_lab.inference.generate import generate
    from moe_lab.models import CustomMoE, ModelConfig, MoEModel, MoEOutput, get_preset, list_presets
    from moe_lab.nn.router import RoutingDecision

    assert moe_lab.MoEModel is MoEModel and moe_lab.ModelConfig is ModelConfig
    assert moe_lab.MoEOutput is MoEOutput and moe_lab.CustomMoE is CustomMoE
    assert moe_lab.get_preset is get_preset and moe_lab.list_presets is list_presets
    assert moe_lab.RoutingDecision is RoutingDecision and moe_lab.generate is generate
    assert isinstance(moe_lab.__version__, str) and moe_lab.__version__
    assert set(moe_lab.__all__) <= set(dir(moe_lab))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = moe_lab.Nope
