"""The evaluation tasks, one module each: ``passkey`` (passkey retrieval),
``ppl`` (decode-mode perplexity) and ``ruler`` (the RULER-style suite)."""
