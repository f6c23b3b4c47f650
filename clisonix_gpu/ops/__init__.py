"""LIAM ops: one module of host code per op (validate, pick a backend, call its kernel)."""

from .transform_matrix import ACTIVATIONS, transform_matrix

__all__ = ["ACTIVATIONS", "transform_matrix"]
