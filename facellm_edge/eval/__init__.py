"""FaceXBench-style multiple-choice evaluation: load + validate a bench, ask a model (transformers or the edge
runtime), extract answer letters, score with bootstrap CIs per task/category/demographic group, compare runs."""
