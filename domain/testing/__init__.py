"""The property-based testing kit: Hypothesis strategies and reference models.

Pure: no I/O, no services. ledgercore's own property suites use exactly these models
and invariant checks, so there is one statement of each invariant of ``shared/spec``.
May import: ``domain`` and ``hypothesis``.
"""
