"""Model cards: the writer (`deepseekmoe.model_cards.card`) and its templates (`<kind>.md`, package data)."""
