"""What the tests share, not tests themselves: the random GVPO inputs and the float64 comparison (cases.py), the
allocation probe (memory.py), the code each spawned rank runs (*_worker.py), and the ahead-of-time compile harness
(aot.py, with the plans it compiles in aot_cases.py and aot_linear.py; also a script: python tests/helpers/aot.py).
"""
