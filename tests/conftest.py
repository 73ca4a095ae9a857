"""Shared fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread: splitting 64-wide layers over cores costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder (the synthetic faces go to ./data); torch's thread count restored afterwards."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """No test reaches the network: downloads are off unless a test turns them back on (tests/test_weights.py serves
    files from 127.0.0.1); the offline choice and remembered failures do not leak between tests."""
    from bench import weights

    monkeypatch.setenv("SIS_BENCH_OFFLINE", "1")
    monkeypatch.delenv(weights.URL_ENV, raising=False)
    weights.reset()
    yield
    weights.reset()


@pytest.fixture(autouse=True)
def quiet_machine(request, monkeypatch):
    """Tests that time things check what is measured, not the machine's quiet: a machine busy with other work (CI's
    neighbours, another test run) must not flag their rows as busy and leave them out of a report.
    tests/test_quiet.py checks the busy detection itself, with the real verdict."""
    if request.module.__name__.rpartition(".")[2] == "test_quiet":
        return
    from bench import quiet

    monkeypatch.setattr(quiet.Quietness, "verdict", lambda self, other_cpus, gflops: "")
