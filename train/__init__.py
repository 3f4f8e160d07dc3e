"""Training stage (torch + timm): DPN-SE family, data and augmentation, fit / evaluate, phantoms.

Importing this package imports neither torch nor timm, so ``cxr-train --help`` and argument errors answer at
once; ``import cxr.train.models`` registers the DPN-SE family with timm (``cxr.train.run`` does it).
"""
