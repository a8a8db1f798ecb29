"""contraseg: global and local contrastive pre-training for segmentation with few labels.

PyTorch implementation of Chaitanya et al., "Contrastive learning of global and local
features for medical image segmentation with limited annotations" (NeurIPS 2020).
"""

__version__ = "0.1.0"
