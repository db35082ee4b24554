"""Error tracking: the document's API, ``errors_total``, Sentry (the only importer of
``sentry_sdk``) and the exceptions nobody caught."""
