"""Benchmarks of gvpo-kernels side by side with the alternatives: ``python -m bench <command>`` from the repository
root (bench/__main__.py lists the commands; bench/README.md says what each measures, results/ holds runs)."""
