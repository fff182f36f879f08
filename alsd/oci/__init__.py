"""Sans-I/O code for OCI images and lazily pullable layer formats.

Nothing in this package performs I/O or imports asyncio/aiohttp/pyfuse3: bytes in,
frozen dataclasses out.
"""
