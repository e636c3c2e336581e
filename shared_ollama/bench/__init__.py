"""The bench: ``python -m shared_ollama.bench`` measures a pool through the very client apps use.

Workload x schedule x pool -> CallRecords + samples -> a versioned result -> reports.
"""
