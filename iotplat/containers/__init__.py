"""The container runtime: services as pinned images (issue 12).

    images.py       image references `name:tag@sha256:...` and iotplat's default pins
    oci.py          OCI image layout: documents, layers and archives written by Python
    archive.py      archives for air-gapped hosts: verified on the controller, checked again after `docker load`
    worker_image.py the worker image, built on the controller from the worker's wheelhouse and a base image
    units.py        the systemd unit that runs a service's container
    engine.py       the Docker engine on a host: daemon.json, preflight

Pure functions over typed values: the spec, the renderer and the roles call them (docs/containers.md).
"""
