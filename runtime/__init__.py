"""EVAR's runtime: exported artifacts (manifest.json + graphs) → images and timings, without torch."""
from evar.runtime.generator import GeneratedImages, Generator

__all__ = ["GeneratedImages", "Generator"]
