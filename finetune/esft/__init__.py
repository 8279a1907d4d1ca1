"""Expert-Specialized Fine-Tuning: score experts on task data, train only the task-relevant ones."""
