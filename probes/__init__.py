"""Probes: one file per way of trying to bring an erased concept back. Never imports ray."""
