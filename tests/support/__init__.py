"""The end-to-end tests' machinery, one module per concern.

- ``waiting``: the one ``wait_until`` and the bound (``TIMEOUT``) of every single wait.
- ``data``: byte patterns with their sha256, document trees.
- ``pki``: the test CA, certificates, client SSL contexts, fingerprints.
- ``proc``: what /proc says about a process: state, ids, children, memory, descriptors.
- ``process``: sniport as a child process (``Sniport``, ``start_sniport``), its command line
  (``run_cli``), and the operations tests' tracker (``Ops``, ``Master``).
- ``configs``: TOML builders for sniport configs.
- ``backends``: what sniport talks to: TLS and TCP upstreams, the HTTP application, a
  WebSocket echo, ports that refuse or never answer.
- ``clients``: what talks to sniport: raw HTTP/1.1 and TLS clients, curl and openssl, a load.
- ``logs``: sniport's connection and request lines (text and JSON), and waits over them.

Everything talks over real sockets on 127.0.0.1 with ports the kernel picks (port 0).
"""
