"""Distilled Decoding (few-step generation) for VAR: pairs from the teacher's flow, the student, its sampler."""
