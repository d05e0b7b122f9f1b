"""TLS to the broker, shared by the sender and the consumers: an ``amqps://`` URL and PEM files.

With an ``amqps://`` URL and no file named, aiormq verifies the broker against the system's
CAs (and honours ``?cafile=&certfile=&keyfile=`` in the URL). The ``*_RABBITMQ_CA_FILE``,
``*_CERT_FILE`` and ``*_KEY_FILE`` settings name mounted files instead, so that a URL kept in a
Secret needs no path in it. The broker's name is always checked against its certificate.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def broker_ssl_context(
    url: str, *, ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext | None:
    """The TLS context for ``url``, or None to let aiormq make its own (plain ``amqp://``, or no file)."""
    if ca_file is None and cert_file is None and key_file is None:
        return None
    if not url.startswith("amqps://"):
        raise ValueError("a broker CA, certificate or key file needs an amqps:// broker URL")
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context
