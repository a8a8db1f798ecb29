"""Dataset readers by name. Each module holds one on-disk layout."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from contraseg.config import DataConfig
    from contraseg.data.readers.base import Reader

# name -> "module:factory"; a factory takes the DataConfig and returns a Reader
_READERS = {
    "acdc": "contraseg.data.readers.acdc:AcdcReader",
    "phantom": "contraseg.data.readers.acdc:PhantomReader",
    "prostate": "contraseg.data.readers.prostate:ProstateReader",
    "mmwhs": "contraseg.data.readers.mmwhs:MmwhsReader",
    "nnunet": "contraseg.data.readers.nnunet:NnunetReader",
    "cityscapes": "contraseg.data.readers.cityscapes:CityscapesReader",
}


def get_reader(config: DataConfig) -> Reader:
    module_name, _, factory = _READERS[config.dataset].partition(":")
    return getattr(importlib.import_module(module_name), factory)(config)
