"""Protein language modelling with favorcore: data (:mod:`.data`) and the
``favorcore protein`` command (:mod:`.cli`)."""

from .data import (
    AMBIGUOUS,
    AMINO_ACIDS,
    Tokenizer,
    concatenated_examples,
    default_fasta,
    mask_tokens,
    read_fasta,
    single_examples,
    split_proteins,
)

__all__ = [
    "AMBIGUOUS",
    "AMINO_ACIDS",
    "Tokenizer",
    "concatenated_examples",
    "default_fasta",
    "mask_tokens",
    "read_fasta",
    "single_examples",
    "split_proteins",
]
