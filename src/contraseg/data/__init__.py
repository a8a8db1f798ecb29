"""Datasets: readers for each layout, the phantom, preprocessing, cache, splits, sampling."""
