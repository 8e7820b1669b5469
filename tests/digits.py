"""The digits data and model the tests use (built by ``service.demo_model``, shared with ``lethe demo``)."""

from service.demo_model import CARD, CLASSES, DigitsData, train_digits_vit, write_digits

__all__ = ["CARD", "CLASSES", "DigitsData", "train_digits_vit", "write_digits"]
