"""MBServ: Pico's reference middlebox (the paper's section 6, "Middlebox Application").

It keeps a TCP state machine per flow (tcp.py), inspects payloads for a configurable list of
malicious strings (inspect.py) and classifies connections to a backend pool by a layer-7 rule
(route.py), all over one 64-byte packed record per flow (state.py) that Pico replicates. A
segment that has no flow state, or does not conform to it, is dropped: without replication a
failover breaks connections, as in the paper's No-HA case. core.py composes the three pure
parts; main.py is the process around them (python -m mbserv, or pico-mbserv); config.py reads
its YAML (example.yaml). README.md in this directory has the design notes.
"""
