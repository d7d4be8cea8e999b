"""Real-time segments (SPEC section 5).

* :mod:`agents.segments.rules`: the rule language, pure: parsing and validation,
  evaluation against a profile view, the per-event index, change-event ids
  (docs/segments.md is its reference).
"""
