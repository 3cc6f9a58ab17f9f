"""Evaluating model packages on labelled images: metrics, plots and reports."""
