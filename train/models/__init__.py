"""Model families registered with timm on import."""

from cxr.train.models import dpn_se  # noqa: F401  (registers dpn*_se with timm)
