"""bench doctor runs without a GPU and says what a GPU run would lack."""
import importlib
import types

import pytest
import torch
from typer.testing import CliRunner

from bench import doctor
from bench.cli import app


def test_doctor_runs_here_and_says_there_is_no_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(app, ["doctor", "--no-plan"])
    assert result.exit_code == 0, result.output
    assert "no CUDA" in result.output and "mamba-ssm" in result.output and "SD-VAE" in result.output
    assert "missing for a GPU run" in result.output
    found = doctor.checks(preset="tiny")
    text = doctor.report(found)
    assert "--preset tiny" in text
    assert {"sisma", "dit", "sdm", "dim"} <= {c.name for c in found if c.section == "plan"}


def test_a_kernel_that_does_not_load_is_reported_with_its_error(monkeypatch):
    real = importlib.import_module

    def fake_import(name, *args):
        if name == "selective_scan_cuda":
            raise ImportError("libcudart.so.13: cannot open shared object file")
        if name.startswith("mamba_ssm"):
            return types.ModuleType(name)
        return real(name, *args)

    monkeypatch.setattr(doctor, "_version", lambda dist: "2.3.2.post1" if "mamba" in dist else None)
    monkeypatch.setattr(doctor.importlib, "import_module", fake_import)
    found = {c.name: c for c in doctor.kernel_checks()}
    mamba = found["mamba-ssm"]
    assert mamba.ok is False and "libcudart.so.13" in mamba.value and "MAMBA_KEEP_CUDA_BUILD=TRUE" in mamba.value
    assert found["causal-conv1d"].ok is False and "not installed" in found["causal-conv1d"].value
    assert "PyTorch scan" in found["SISMA scan on a GPU"].value

