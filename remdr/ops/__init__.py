"""Operations tooling: process groups and cleanup, the deployment PKI, the loopback harness.

Used by the `remdr-server`/`remdr-client` wrappers, the simulator, the chaos drill and the tests;
never by the ML core or a site's training.
"""
