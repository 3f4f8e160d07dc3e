"""The default class list: the CoroNet / Cheng et al. 2021 four-class scheme.

A bundle's ``card.json`` is the authority for a deployed model; this list is what a new run starts from
when the data folder uses these names.
"""

CLASSES: tuple[str, ...] = ("covid19", "normal", "pneumonia_bacterial", "pneumonia_viral")
COVID_CLASS = "covid19"
