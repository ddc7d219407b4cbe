"""Evaluation: metrics, protocols, judges, reports."""
