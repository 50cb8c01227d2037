"""Benchmark evaluation: tasks, scoring, the HumanEval sandbox and reports."""
