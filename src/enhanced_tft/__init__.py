"""Enhanced TFT: Temporal Fusion Transformers with stacked transformer blocks for market time series."""
__version__ = "0.1.0"
