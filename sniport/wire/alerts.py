"""TLS alert records sniport sends itself (sans-IO constants).

Rule: only fatal alerts, sent in the clear before any handshake, in a TLS 1.2-versioned
record as RFC 8446 section 5.1 asks of every record after the ClientHello.
"""

# RFC 8446 section 6: Alert { level fatal(2), description unrecognized_name(112) },
# RFC 6066 section 3: the answer to a server_name the server does not know.
UNRECOGNIZED_NAME = bytes([21, 3, 3, 0, 2, 2, 112])
# RFC 8446 section 6.2: access_denied(49), "a valid certificate or PSK was received, but
# when access control was applied, the sender decided not to proceed" -- the nearest alert
# to a client that a block's allow/deny lists refuse.
ACCESS_DENIED = bytes([21, 3, 3, 0, 2, 2, 49])
# RFC 7301 section 3.2: no_application_protocol(120), for a hello whose ALPN list we will
# not serve; here an ``acme-tls/1`` hello with no challenge of ours pending (RFC 8737).
NO_APPLICATION_PROTOCOL = bytes([21, 3, 3, 0, 2, 2, 120])
