"""Pickle payloads that run a command when unpickled (each `touch`es a marker file, so a test can see
whether it ran): what a malicious weights file holds. Shared by tests/test_safe_pickle.py and
tests/faults/test_malicious_pickles.py."""
import builtins
import os
import subprocess


class System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Eval(System):
    def __reduce__(self):
        return builtins.eval, (f"__import__('os').system('touch {self.marker}')",)


class Exec(System):
    def __reduce__(self):
        return builtins.exec, (f"import os; os.system('touch {self.marker}')",)


class Popen(System):
    def __reduce__(self):
        return subprocess.Popen, (["touch", self.marker],)
