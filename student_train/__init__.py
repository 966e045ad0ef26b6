"""The student trainer: a small PyTorch model learned from the teacher's accepted labels.

Importing this package is cheap; torch loads with the submodules that need it
(``student_train.bag``, ``student_train.train``). ``student_train.data`` and
``student_train.features`` need only numpy.
"""

from __future__ import annotations

__all__: list[str] = []
