"""Figures for a run folder (matplotlib, Agg backend): losses, mixture shares, spectrograms."""
from ualm_jax.report.plots import plot_losses, plot_mixture, plot_spectrograms

__all__ = ["plot_losses", "plot_mixture", "plot_spectrograms"]
