"""Drafter training: self-distillation data (Parquet), EAGLE and Medusa training, acceptance evaluation."""
