"""Model card templates (package data of deepseekmoe.model_card)."""
