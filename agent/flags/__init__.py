"""OpenFeature feature flags: which entries are flags, flagd definitions, OFREP routes.

    definition.py   the rule (flag services, what is a definition) + flagd schema check
    flagset.py      a snapshot's flags, parsed once (flagd evaluator library)
    evaluate.py     one evaluation: request context in, OFREP result out
    ofrep.py        the OFREP routes of the local API (single, bulk + ETag, configuration)
"""
