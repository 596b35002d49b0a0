"""Evaluation shared by the training notebooks and 08_benchmarking: multiple-choice scoring
(``mcq``) and failure patterns (``errors``)."""
