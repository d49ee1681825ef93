"""Placement across machines: this node's registration in Redis, the atomic reservation of a
slot on the least-loaded node, the cluster-wide room map. Imports only redis (and the stdlib).
"""
