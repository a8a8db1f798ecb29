"""Datasets: readers for each on-disk layout, the phantom, preprocessing, cache, splits, sampling."""
