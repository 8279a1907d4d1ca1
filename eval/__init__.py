"""Evaluation of DeepSeekMoE models: the lm-evaluation-harness suite and expert-routing analysis."""
