"""Fine-tuning DeepSeekMoE: SFT (full, LoRA, QLoRA) and Expert-Specialized Fine-Tuning (ESFT)."""
