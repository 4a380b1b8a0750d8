"""Peer-to-peer blob distribution (DADI's P2P tree): peers, a host harness, a scale model."""
