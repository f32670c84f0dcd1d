"""iotplat: one declarative spec -> a secure, self-hosted IoT platform.

The engine is split into one package per stage (see README "How it works"):
spec (load + validate) -> render (build directory) -> deploy -> verify; secrets holds the
state directory. `iotplat.worker` is the ingestion worker and imports none of the others.
"""

__version__ = "0.1.0"
API_VERSION = "iotplat/v1"
