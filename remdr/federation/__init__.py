"""What a federated site and the coordinator do, without Flower.

`site_round` is one site's round (load its data, train the global model, evaluate), `run_config`
the federation's settings, `run_directory` the coordinator's checkpoints and report, `screening`
the checks a site update must pass before aggregation, `app_bundle` the configuration-only Flower
App. `remdr.server`, `remdr.client` and `remdr.sim` translate Flower messages to these calls.
"""
