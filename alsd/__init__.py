"""alsd: an Additional Layer Store daemon for containers/storage (podman, CRI-O)."""

__version__ = "0.1.0"
