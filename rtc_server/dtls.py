"""DTLS that peers with RSA certificates can complete.

aiortc's DTLS context offers only ECDHE-ECDSA cipher suites. Its own certificate is ECDSA, so
that is enough while aiortc is the DTLS server; but it answers offers as the DTLS client, and a
server whose certificate is RSA (GStreamer's webrtcbin, and every WHIP encoder built on it)
then finds no shared cipher and the handshake fails. The ECDHE-RSA suites, added after the
ECDSA ones, let both kinds of peer in; aiortc's certificate, and so the suite an ECDSA peer
agrees, stay as they were.

aiortc has no setting for this. The change upstream would be this list, in one line of
`RTCCertificate._create_ssl_context`; until then `accept_rsa_peers` wraps that method, once,
here and nowhere else.
"""

from __future__ import annotations

from aiortc.rtcdtlstransport import RTCCertificate, SRTPProtectionProfile
from OpenSSL import SSL

CIPHERS = b":".join(
    (
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-ECDSA-AES128-SHA",
        b"ECDHE-ECDSA-AES256-SHA",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-AES128-SHA",
        b"ECDHE-RSA-AES256-SHA",
    )
)

_original = RTCCertificate._create_ssl_context


def _create_ssl_context(
    self: RTCCertificate, srtp_profiles: list[SRTPProtectionProfile]
) -> SSL.Context:
    context = _original(self, srtp_profiles)
    context.set_cipher_list(CIPHERS)
    return context


def accept_rsa_peers() -> None:
    """Offer the ECDHE-RSA suites too, from now on, in every DTLS handshake of aiortc's."""
    RTCCertificate._create_ssl_context = _create_ssl_context  # type: ignore[method-assign]
