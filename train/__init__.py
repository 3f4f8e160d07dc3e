"""Training stage (torch + timm): DPN-SE family, data and augmentation, fit / evaluate, phantoms.

Importing this package registers the DPN-SE models with timm.
"""

from cxr.train import models  # noqa: F401
