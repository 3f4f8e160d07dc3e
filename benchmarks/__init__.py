"""``cxr-bench``: latency, LIME cost and fidelity, serve load, the OOD gate, ablation tables and reports; the
GPU scripts beside them. One-question research scripts live in ``research/``, outside the package."""
