"""EVAR's runtime: exported artifacts (manifest.json + graphs) → images and timings, without torch."""
from runtime.generator import Generation, Generator

__all__ = ["Generation", "Generator"]
